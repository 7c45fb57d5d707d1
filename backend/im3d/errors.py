"""One error base for the whole backend: every user-facing failure is an `Im3dError` with a `code`.

The code is stable (clients switch on it) and the message says what to do. What a code means to
the outside is decided here, once: `http_status(code)` for the HTTP API and `exit_code(code)` for
the CLI. Nothing else translates errors, and nothing matches on exception class names.
"""

from __future__ import annotations

import errno
import sys


class Cancelled(Exception):
    """The user cancelled; raised between steps when the cancel callback turns true."""


class Im3dError(Exception):
    """A failure the user can act on: `code` is stable (for clients), `message` says what to do."""

    code: str = "internal_error"

    def __init__(self, code: str | None = None, message: str = ""):
        if code is not None:
            self.code = code
        self.message = message or self.code.replace("_", " ")
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


# The pipeline's errors are the same kind of error; the name stays for readability at raise sites.
PipelineError = Im3dError


class ModelNotFoundError(Im3dError):
    def __init__(self, message: str):
        super().__init__("model_not_found", message)


# code -> HTTP status. A code missing here is a failed job's reason (it never answers a request
# by itself) and maps to 422 if raised while validating a request.
HTTP_STATUS: dict[str, int] = {
    # 400: the bytes sent are malformed
    "bad_request": 400,
    "invalid_json": 400,
    "invalid_upload": 400,
    "image_too_large": 400,
    "path_outside_upload": 400,
    # 401/403: who may ask
    "unauthorized": 401,
    "forbidden_host": 403,
    # 404
    "not_found": 404,
    "job_not_found": 404,
    "artifact_not_found": 404,
    "preview_not_found": 404,
    "method_not_allowed": 405,
    # 413/415: size and type of what was sent
    "request_too_large": 413,
    "upload_too_large": 413,
    "unsupported_media_type": 415,
    # 422: well-formed but not acceptable
    "invalid_request": 422,
    "invalid_config": 422,
    "invalid_dataset": 422,
    "invalid_views": 422,
    "upload_not_found": 422,
    "wrong_upload_kind": 422,
    "model_not_found": 422,
    "out_of_memory": 422,
    # 503/507: the service cannot take it now
    "queue_full": 503,
    "shutting_down": 503,
    "storage_error": 507,
    "internal_error": 500,
}

# code -> CLI exit status (anything else that is an Im3dError exits 1; cancel is 130 like SIGINT).
EXIT_CODES: dict[str, int] = {
    "invalid_config": 2,
    "invalid_request": 2,
    "invalid_dataset": 3,
    "invalid_views": 3,
    "invalid_splats": 3,
    "invalid_image": 3,
    "invalid_ply": 3,
    "file_not_found": 3,
    "invalid_path": 3,
    "image_too_large": 3,
    "path_outside_upload": 3,
    "model_not_found": 4,
    "out_of_memory": 5,
    "storage_error": 6,
    "internal_error": 70,
}


def http_status(code: str) -> int:
    return HTTP_STATUS.get(code, 422)


def exit_code(code: str) -> int:
    return EXIT_CODES.get(code, 1)


# errno values that mean "the output folder cannot take this write": reported as storage_error.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOTDIR}
if hasattr(errno, "EDQUOT"):
    STORAGE_ERRNOS.add(errno.EDQUOT)


def storage_error(error: OSError, what: str, folder=None) -> Im3dError:
    where = f" {error.filename}" if error.filename else (f" into {folder}" if folder else "")
    return Im3dError(
        "storage_error",
        f"could not {what}{where}: {error.strerror or error}; free disk space or set server.jobs_dir to a writable folder",
    )


def as_im3d_error(error: BaseException, folder=None) -> Im3dError | None:
    """The user-facing form of errors that come from the platform rather than from our code."""
    if isinstance(error, Im3dError):
        return error
    torch = sys.modules.get("torch")  # only when torch is loaded: the HTTP side never imports it
    torch_oom = getattr(torch, "OutOfMemoryError", None) or getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if isinstance(error, MemoryError) or (torch_oom is not None and isinstance(error, torch_oom)):
        return Im3dError("out_of_memory", "the job ran out of memory; use the fast preset or lower recon.image_size / mesh.grid_resolution")
    if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
        return storage_error(error, "write", folder)
    if isinstance(error, FileNotFoundError):
        return Im3dError("file_not_found", f"{error.filename or error}: no such file or folder; check the path")
    if isinstance(error, (IsADirectoryError, NotADirectoryError, FileExistsError)):
        return Im3dError("invalid_path", f"{error.filename or error}: {error.strerror or error}; give a path of the right kind (file or folder)")
    if _is_decompression_bomb(error):
        return Im3dError("image_too_large", f"{error}; use smaller images (the fit uses recon.image_size pixels anyway)")
    return None


def _is_decompression_bomb(error: BaseException) -> bool:
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(error, pil.DecompressionBombError)


def check_cancel(cancel) -> None:
    """Raise `Cancelled` when the optional `cancel()` callable says so."""
    if cancel is not None and cancel():
        raise Cancelled()
