"""Per-artist bearer tokens for a shared (studio) backend: `server.tokens_file`.

The file holds one `name token` pair per line (`#` starts a comment). It is re-read whenever it
changes on disk, so revoking an artist is deleting their line: the others keep working and nothing
restarts. The backend's own token (`server.token_file`) stays valid under the name `local`, for
scripts on the head node. Only names are ever logged, never tokens.

    python -m im3d.service.tokens add alice /srv/im3d/tokens      # prints alice's new token once
    python -m im3d.service.tokens revoke alice /srv/im3d/tokens
    python -m im3d.service.tokens list /srv/im3d/tokens           # names only
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
import sys
import threading
from pathlib import Path

from im3d.config import ConfigError

log = logging.getLogger("im3d.server")

ARTIST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
LOCAL_ARTIST = "local"  # the name the backend's own token goes by


def parse_tokens(text: str, source: str = "tokens file") -> dict[str, str]:
    """`name token` lines -> {name: token}; a clear ConfigError naming the line when malformed."""
    tokens: dict[str, str] = {}
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{source}, line {number}: expected 'name token', got {len(parts)} words")
        name, token = parts
        if not ARTIST_NAME_RE.match(name) or name == LOCAL_ARTIST:
            raise ConfigError(f"{source}, line {number}: {name!r} is not a usable artist name (letters, digits, _.@-; not 'local')")
        if len(token) < 16:
            raise ConfigError(f"{source}, line {number}: the token of {name} is shorter than 16 characters; make one with 'python -m im3d.service.tokens add {name} FILE'")
        if name in tokens or token in seen:
            raise ConfigError(f"{source}, line {number}: {name} or its token is listed twice; every artist needs their own token")
        tokens[name] = token
        seen.add(token)
    return tokens


class TokenBook:
    """Who a bearer token belongs to; the tokens file is re-read when its mtime or size changes.

    A file that becomes unreadable or malformed while the backend runs denies every artist token
    (failing closed) until it is fixed, and says so in the log once per change.
    """

    def __init__(self, path: str | Path, local_token: str | None = None):
        self.path = Path(path).expanduser()
        self.local_token = local_token
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._tokens: dict[str, str] = {}
        self._load(first=True)

    def _load(self, first: bool = False) -> None:
        try:
            info = self.path.stat()
            stamp = (info.st_mtime_ns, info.st_size)
        except OSError as error:
            if first:
                raise ConfigError(f"cannot read server.tokens_file {self.path}: {error.strerror}; create it with 'python -m im3d.service.tokens add NAME {self.path}'") from None
            stamp = (-1, -1)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            tokens = parse_tokens(self.path.read_text(encoding="utf-8"), str(self.path))
        except (OSError, UnicodeDecodeError, ConfigError) as error:
            if first:
                raise ConfigError(str(error)) from None
            log.error("tokens file %s is unreadable (%s); every artist token is refused until it is fixed", self.path, error)
            self._tokens = {}
            return
        if not first:
            log.info("tokens file %s reloaded: %d artist(s): %s", self.path, len(tokens), ", ".join(sorted(tokens)) or "none")
        self._tokens = tokens

    def artist_for(self, token: str | bytes) -> str | None:
        """The artist a presented token belongs to, or None. Every entry is compared in constant time."""
        given = token.encode() if isinstance(token, str) else bytes(token)
        with self._lock:
            self._load()
            entries = list(self._tokens.items())
        if self.local_token is not None:
            entries.append((LOCAL_ARTIST, self.local_token))
        found = None
        for name, expected in entries:
            if hmac.compare_digest(given, expected.encode()) and found is None:
                found = name
        return found

    def artists(self) -> list[str]:
        with self._lock:
            self._load()
            return sorted(self._tokens)


# -- editing the file (the admin's commands) -------------------------------------------------------

def _read(path: Path) -> dict[str, str]:
    return parse_tokens(path.read_text(encoding="utf-8"), str(path)) if path.exists() else {}


def _write(path: Path, tokens: dict[str, str]) -> None:
    from im3d.io_utils import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(f"{name} {token}\n" for name, token in tokens.items()))
    if os.name == "posix":
        os.chmod(path, 0o600)


def add_artist(path: str | Path, name: str) -> str:
    path = Path(path).expanduser()
    if not ARTIST_NAME_RE.match(name) or name == LOCAL_ARTIST:
        raise ConfigError(f"{name!r} is not a usable artist name (letters, digits, _.@-; not 'local')")
    tokens = _read(path)
    tokens[name] = secrets.token_urlsafe(32)  # adding an existing name rotates their token
    _write(path, tokens)
    return tokens[name]


def revoke_artist(path: str | Path, name: str) -> bool:
    path = Path(path).expanduser()
    tokens = _read(path)
    if tokens.pop(name, None) is None:
        return False
    _write(path, tokens)
    return True


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m im3d.service.tokens", description="Per-artist tokens of a shared backend (server.tokens_file).")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, text in (("add", "add an artist (or rotate their token); prints the token once"), ("revoke", "remove an artist's token")):
        p = sub.add_parser(command, help=text)
        p.add_argument("name")
        p.add_argument("file")
    p = sub.add_parser("list", help="the artists' names (never their tokens)")
    p.add_argument("file")
    args = parser.parse_args(argv)
    try:
        if args.command == "add":
            print(add_artist(args.file, args.name))
        elif args.command == "revoke":
            if not revoke_artist(args.file, args.name):
                print(f"{args.name} has no token in {args.file}", file=sys.stderr)
                return 1
        else:
            print("\n".join(sorted(_read(Path(args.file).expanduser()))))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
