"""What ``vlm serve`` refuses and how it sheds load: body size, context length, drain on shutdown.

Refusals are :class:`APIError` (OpenAI-style bodies): 413 for a body over ``--max-request-mb``,
400 for a prompt plus ``max_tokens`` over the model's context, 503 (with ``Retry-After``) while
the server drains for shutdown.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Optional

from vlm.inference.serving.requests import APIError

CHAT_PATH = "/v1/chat/completions"
DEFAULT_MAX_TOKENS = 256


async def read_body(request, max_bytes: int) -> bytes:
    """The request body, refused with 413 once over ``max_bytes``: a larger Content-Length before
    anything is read, a chunked body as soon as its bytes pass the limit."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise _too_large(int(length), max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, max_bytes: int, at_least: bool = False) -> APIError:
    more = "at least " if at_least else ""
    return APIError(f"the request body is {more}{size} bytes, over the server's limit of {max_bytes} bytes "
                    "(--max-request-mb)", code="request_too_large", status=413)


def completion_budget(prompt_tokens: int, max_tokens: int, given: bool, context: Optional[int]) -> int:
    """The ``max_tokens`` to generate: the request's own, refused (400, vLLM's message) when the
    prompt and it exceed ``context``; the default (not ``given``) lowered to what the context leaves."""
    if context is None:
        return max_tokens
    if not given:
        max_tokens = max(1, min(max_tokens, context - prompt_tokens))
    if prompt_tokens + max_tokens > context:
        raise APIError(f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                       "completion). Please reduce the length of the messages or completion.",
                       param="messages", code="context_length_exceeded")
    return max_tokens


class ServerState:
    """Chat requests in flight and whether the server drains for shutdown (then new ones get 503)."""

    def __init__(self):
        self.draining = False
        self._in_flight = 0
        self._idle = threading.Condition()

    def in_flight(self) -> int:
        """Chat requests being answered now."""
        return self._in_flight

    def enter(self) -> None:
        """A chat request starts."""
        with self._idle:
            self._in_flight += 1

    def leave(self) -> None:
        """A chat request is answered (or failed)."""
        with self._idle:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()

    def start_draining(self) -> None:
        """Refuse new chat requests from now on."""
        self.draining = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the requests in flight to end; whether they did."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._in_flight, timeout=timeout)


class AdmissionMiddleware:
    """ASGI middleware on the chat path: 503 while draining, counts requests in flight, and
    records each one's status code and latency in ``metrics``."""

    def __init__(self, app, state: ServerState, metrics, retry_after_s: int = 5):
        self.app, self.state, self.metrics, self.retry_after_s = app, state, metrics, retry_after_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        if self.state.draining:
            await _send_json(send, 503, draining_error(self.retry_after_s))
            self.metrics.observe(503, time.perf_counter() - start)
            return
        status = [500]  # an exception that escapes becomes a 500 outside this middleware

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.state.enter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.state.leave()
            self.metrics.observe(status[0], time.perf_counter() - start)


def draining_error(retry_after_s: int) -> APIError:
    """The 503 a request gets while the server shuts down."""
    return APIError("the server is shutting down and takes no new requests", code="server_shutting_down",
                    status=503, kind="server_error", headers={"Retry-After": str(retry_after_s)})


async def _send_json(send, status: int, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
