"""The HTTP/1.1 transport: uvicorn's h11 protocol with a deadline for the request headers.

    config = uvicorn_config(app, settings, host="127.0.0.1", port=8000)
    uvicorn.Server(config).run()

uvicorn closes idle kept-alive connections (`timeout_keep_alive`), but it waits for the request
line and headers of a request without limit: a client that opens connections and sends its
headers a byte at a time holds each of them for as long as it likes. `HeaderTimeoutProtocol`
gives every request `header_timeout_s` from the moment the connection opened (or the previous
response ended) to finish its headers; after that a client that had sent part of a request gets
408 and the connection is closed, and one that had sent nothing is closed without a word. The
body has its own deadline, enforced by the app (`app.BodyMiddleware`), because only the app reads
it. Requests go through h11 (not httptools) so that the deadline always applies.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from codegemma.server.protocol import error_body
from codegemma.server.settings import ServerSettings


def timeout_error(what: str) -> dict[str, Any]:
    """The body of a 408: what did not arrive in time, and what to do."""
    message = f"The request {what} did not arrive in time; send the whole request without pausing."
    return error_body(message, type="invalid_request_error", code="request_timeout")


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's line and headers."""

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._sync_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._sync_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync_header_timer()

    def _sync_header_timer(self) -> None:
        """Run the timer exactly while the connection waits for a request's headers (h11's
        `their_state` is IDLE from the end of one request until the next one's headers are in)."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)
        elif not waiting:
            self._cancel_header_timer()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        partial, _ = self.conn.trailing_data
        if partial and self.conn.our_state is h11.IDLE:
            self._send_408(json.dumps(timeout_error("line and headers")).encode("utf-8"))
        self.transport.close()

    def _send_408(self, body: bytes) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            for event in (
                h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # h11 cannot answer in this state: just close
            pass


def uvicorn_config(
    app: Any, settings: ServerSettings, *, host: str, port: int, **options: Any
) -> uvicorn.Config:
    """A uvicorn configuration serving `app` with `settings`' connection timeouts; `options` go
    to uvicorn.Config as they are (log_level, lifespan, ...)."""
    protocol = functools.partial(HeaderTimeoutProtocol, header_timeout_s=settings.header_timeout_s)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,  # type: ignore[arg-type]
        timeout_keep_alive=settings.keep_alive_s,
        **options,
    )
