"""Who may talk to the backend: the Host allow-list, the bearer token and the JSON body cap.

A pure ASGI middleware, so it runs before any body is parsed; plus the token file itself.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
import stat
from pathlib import Path

from fastapi.responses import JSONResponse

from im3d.config import ConfigError

log = logging.getLogger("im3d.server")

MAX_JSON_BYTES = 1 << 20
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


HOST_RE = re.compile(r"^(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9.-]+))(?::(?P<port>[0-9]{1,5}))?$")


def parse_host(host: str) -> tuple[str, int | None] | None:
    """`name[:port]` or `[v6][:port]` of a Host header, strictly (RFC 9110): None if malformed."""
    match = HOST_RE.match(host.lower())
    if match is None:
        return None
    port = match.group("port")
    if port is not None and not 0 < int(port) <= 65535:
        return None
    return match.group("v6") or match.group("name"), int(port) if port else None


def host_is_loopback(host: str) -> bool:
    """True for 127.0.0.1, localhost or ::1 with an optional numeric port; anything else is refused
    (a malformed header too: `localhost:abc`, `localhost:80:80`, userinfo, spaces)."""
    parsed = parse_host(host)
    return parsed is not None and parsed[0] in LOOPBACK_HOSTS


class GuardMiddleware:
    def __init__(self, app, token: str, allow_remote: bool, tokens=None):
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.allow_remote = allow_remote
        self.tokens = tokens  # per-artist tokens (service/tokens.TokenBook, server.tokens_file) or None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        headers = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.lower(), value)
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.allow_remote and not host_is_loopback(host):
            await error_response(403, "forbidden_host", f"requests must address the backend as 127.0.0.1 or localhost, not {host[:100]!r}; enable server.allow_remote for remote access")(scope, receive, send)
            return
        given = headers.get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if self.tokens is not None:
            # The artist a job belongs to (fair queueing, logs) rides on the request's state.
            artist = self.tokens.artist_for(token.strip()) if scheme.lower() == b"bearer" else None
            authorised = artist is not None
            scope = dict(scope, state={**scope.get("state", {}), "artist": artist})
        else:
            authorised = hmac.compare_digest(b"Bearer " + token.strip(), self.expected) and scheme.lower() == b"bearer"
        if not authorised:
            reason = "missing" if not given else "wrong"
            await error_response(
                401, "unauthorized", f"the bearer token is {reason}; send 'Authorization: Bearer <token>' with the token from the backend's token file",
                headers={"WWW-Authenticate": "Bearer"},
            )(scope, receive, send)
            return
        if scope["path"] != "/v1/uploads" and scope["method"] in ("POST", "PUT", "PATCH"):
            content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if content_type and content_type != b"application/json" and not content_type.endswith(b"+json"):
                await error_response(
                    415, "unsupported_media_type", f"this route takes JSON; send Content-Type: application/json, not {content_type.decode('latin-1')[:60]!r}"
                )(scope, receive, send)
                return
            receive = await self._capped_body(scope, receive, send, headers)
            if receive is None:
                return
            if not content_type:  # a body without Content-Type is read as JSON
                scope = dict(scope, headers=[*scope["headers"], (b"content-type", b"application/json")])
        await self.app(scope, receive, send)

    async def _capped_body(self, scope, receive, send, headers):
        """Read a JSON body up to MAX_JSON_BYTES and replay it; a 413 past that."""
        too_large = error_response(413, "request_too_large", f"request bodies are limited to {MAX_JSON_BYTES // 1024} KiB")
        try:
            if int(headers.get(b"content-length", b"0")) > MAX_JSON_BYTES:
                await too_large(scope, receive, send)
                return None
        except ValueError:
            await error_response(400, "bad_request", "the Content-Length header is not a number")(scope, receive, send)
            return None
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > MAX_JSON_BYTES:
                await too_large(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay



def load_or_create_token(path: Path) -> str:
    """Read the token, or create it (user-only file) when absent; never logs the token itself."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as error:
        raise ConfigError(f"cannot create the token file {path}: {error.strerror}; set server.token_file to a writable path") from None
    else:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
        log.info("created a new API token in %s", path)
    try:
        if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o600)
            log.warning("token file %s was readable by others; made it user-only (0600)", path)
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the token file {path}: {error}; delete it to have a new one made") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ConfigError(f"the token in {path} is too short or malformed; delete the file to have a new one made")
    return token

