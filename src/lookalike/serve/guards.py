"""ASGI guards of the web app against hostile requests: a read deadline for request bodies (slow or stalled clients)
a deadline for request headers (uvicorn protocol), and the security headers of every response. The byte limit is
Starlette's RequestBodyLimitMiddleware (via FastAPI's
max_body_size) and the Host check its TrustedHostMiddleware."""

from __future__ import annotations

import asyncio

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
SECURITY_HEADERS = {
    # the page loads only its own script, style and images (uploaded previews are blob: URLs); nothing may frame it
    "content-security-policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}
CLOSE = {"Connection": "close"}  # the rest of an unread body is not worth reading: the server hangs up after answering


class RequestTimeout(HTTPException):
    """A request body that stalled or took too long (408); raised from `receive`, FastAPI passes HTTPExceptions on."""

    def __init__(self, detail: str) -> None:
        super().__init__(408, detail, headers=CLOSE)


class BodyTooLarge(HTTPException):
    """A request body over the byte limit (413), announced by Content-Length or counted as it arrived (chunked)."""

    def __init__(self, announced: int | None, limit: int) -> None:
        size = f"{announced:,} bytes is" if announced is not None else "the body (sent without a length) grew"
        super().__init__(413, f"upload: {size} more than the limit of {limit:,} bytes", headers=CLOSE)


class BodyGuard:
    """Read request bodies within bounds: at most `max_bytes` (counted as they arrive, whatever Content-Length says;
    413), at most `idle` seconds without a byte and `total` seconds in all (408). Raised from `receive`, so the
    multipart parser stops spooling at once."""

    def __init__(self, app: ASGIApp, max_bytes: int, idle: float, total: float) -> None:
        self.app, self.max_bytes, self.idle, self.total = app, max_bytes, idle, total

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on with a `receive` that counts bytes and times out while the body is still arriving."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline, length = loop.time() + self.total, _content_length(scope)
        received, done = 0, False

        async def guarded_receive() -> Message:
            nonlocal received, done
            if done:  # the body is complete: waiting for a disconnect is not reading
                return await receive()
            if length is not None and length > self.max_bytes:
                raise BodyTooLarge(length, self.max_bytes)
            left = deadline - loop.time()
            try:
                message = await asyncio.wait_for(receive(), min(self.idle, max(left, 0.0)))
            except TimeoutError:
                why = f"no data for {self.idle:g} s" if left > self.idle else f"not complete after {self.total:g} s"
                raise RequestTimeout(f"request: the body stopped arriving ({why}); the connection is closed") from None
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(length, self.max_bytes)
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, guarded_receive, send)


def _content_length(scope: Scope) -> int | None:
    """The request's Content-Length header as a number (None when absent or not a number)."""
    value = dict(scope.get("headers", [])).get(b"content-length", b"")
    return int(value) if value.isdigit() else None


class SecurityHeaders:
    """Add SECURITY_HEADERS to every HTTP response (those the app set itself are kept)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; add the headers to the response's start message."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def allowed_hosts(host: str, extra: list[str]) -> list[str]:
    """Host header names the app answers: loopback names, the address it listens on (unless every interface), and
    `extra` (serve.allowed_hosts). Anything else is refused, which defeats DNS rebinding against a local server."""
    bound = [] if host in WILDCARD_BINDS else [f"[{host}]" if ":" in host else host]
    return list(dict.fromkeys([*LOOPBACK_HOSTS, *bound, *extra]))


class HeaderDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers do not arrive within `header_timeout`
    seconds of it opening or of the previous response (uvicorn only times out idle keep-alive connections)."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the clock for the first request's headers."""
        super().connection_made(transport)
        self._await_request()

    def on_response_complete(self) -> None:
        """Start the clock for the next request's headers."""
        super().on_response_complete()
        self._await_request()

    def _await_request(self) -> None:
        """Close the connection unless a new request (cycle) has started by the deadline."""
        cycle = self.cycle
        self.loop.call_later(self.header_timeout, self._close_if_no_request, cycle)

    def _close_if_no_request(self, cycle: object) -> None:
        if self.cycle is cycle and not self.transport.is_closing():
            self.transport.close()


def header_deadline_protocol(seconds: float) -> type[HeaderDeadlineH11]:
    """HeaderDeadlineH11 with its timeout set (uvicorn instantiates the protocol class itself)."""
    return type("HeaderDeadlineH11", (HeaderDeadlineH11,), {"header_timeout": seconds})
