"""Exceptions that cross module boundaries; each user-facing one carries a stable `code`."""

from __future__ import annotations


class Cancelled(Exception):
    """The user cancelled; raised between steps when the cancel callback turns true."""


class PipelineError(RuntimeError):
    """A failure the user can act on: `code` is stable (for clients), `message` says what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ModelNotFoundError(PipelineError):
    def __init__(self, message: str):
        super().__init__("model_not_found", message)


def check_cancel(cancel) -> None:
    """Raise `Cancelled` when the optional `cancel()` callable says so."""
    if cancel is not None and cancel():
        raise Cancelled()
