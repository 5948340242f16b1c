"""The FastAPI app of ``vlm serve``: OpenAI's chat completions and models, /health, a web page.

Errors are OpenAI-style JSON (``{"error": {"message", "type", "param", "code"}}``): 400 for a
bad request (or one over the model's context), 413 for a body over the size limit, 503 with
``Retry-After`` when the queue is full or the server shuts down, 504 when a request is not
answered in time, 500 (logged, no traceback in the body) for a server failure. GET /metrics
is Prometheus' text format; :func:`run_server` drains in-flight requests on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import AsyncIterator, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlm.inference.serving.engine import Completion, GenerationEngine, GenerationRequest, QueueFull
from vlm.inference.serving.limits import AdmissionMiddleware, ServerState, completion_budget, read_body
from vlm.inference.serving.metrics import ServeMetrics
from vlm.inference.serving.requests import APIError, ChatRequest, frame_counts_of, parse_chat_request

logger = logging.getLogger(__name__)


def _error(status: int, message: str, kind: str, code: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def create_app(engine: GenerationEngine, model_name: str = "vlm", image_root: Optional[str | Path] = None,
               max_request_mb: float = 20.0, request_timeout_s: float = 300.0) -> FastAPI:
    """The app serving ``engine``'s model as ``model_name``; local image paths only under
    ``image_root`` (None: refused); bodies up to ``max_request_mb`` MiB; a request not answered
    within ``request_timeout_s`` gets 504. ``app.state.serving`` is its :class:`ServerState`."""
    root = Path(image_root).resolve() if image_root else None
    max_bytes = int(max_request_mb * 2**20)
    app = FastAPI(title="vlm serve", docs_url=None, redoc_url=None)
    created = int(time.time())
    state = app.state.serving = ServerState()
    metrics = ServeMetrics(engine, state.in_flight)
    app.add_middleware(AdmissionMiddleware, state=state, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        return _error(400, f"invalid request: {exc.errors()[:1]}", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def server_error(_, exc: Exception):
        logger.exception("request failed")
        return _error(500, f"internal server error ({type(exc).__name__})", "server_error")

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining", "model": model_name}, status_code=503)
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "vlm"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("vlm.inference.serving").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        deadline = Deadline(request_timeout_s)
        raw = await read_body(request, max_bytes)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(f"the request body is not valid JSON: {exc}")
        # decoding images and tokenizing is CPU work: off the event loop
        chat, prompt_tokens = await asyncio.to_thread(_parse, engine, body, root)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            return await _start_stream(engine, chat, prompt_tokens, completion_id, model_name, request.receive,
                                       deadline)
        generation = _submit(engine, _generation(chat))
        done = await _wait(asyncio.wrap_future(generation.future), generation, request.receive, deadline)
        return _completion(chat, prompt_tokens, done, completion_id, model_name)

    return app


class Deadline:
    """When a request's time (``--request-timeout-s``, counted from its arrival) runs out."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.at - time.monotonic())

    def error(self) -> APIError:
        """The 504 a request gets when its time has run out."""
        return APIError(f"the request was not answered within {self.seconds:g} s (--request-timeout-s)",
                        code="timeout", status=504, kind="timeout_error")


def _parse(engine: GenerationEngine, body, root: Optional[Path]) -> Tuple[ChatRequest, int]:
    """The validated request and its prompt's token count (text and visual tokens, as the
    processor encodes them); over the model's context: 400, before anything is queued."""
    chat = parse_chat_request(body, root)
    processor = engine.processor
    images = chat.sample.images  # with AnyRes tiling each image's own count, from its size
    counts = processor.image_token_counts(processor.image_layouts(images), len(images))
    prompt = len(processor.tokenize(processor.prompt_turns(chat.sample.turns), add_generation_prompt=True,
                                    image_tokens=counts, frame_counts=frame_counts_of(processor, chat.sample))[0])
    chat.max_tokens = completion_budget(prompt, chat.max_tokens, chat.max_tokens_given, engine.context_length)
    return chat, prompt


def _submit(engine: GenerationEngine, generation: GenerationRequest) -> GenerationRequest:
    """Queue ``generation``; a full queue is a 503 with Retry-After."""
    try:
        engine.submit(generation)
    except QueueFull as exc:
        raise APIError(f"the server is busy: {exc}; retry later", code="queue_full", status=503,
                       kind="server_error", headers={"Retry-After": str(engine.retry_after_s())}) from None
    return generation


async def _client_gone(receive) -> None:
    """Returns when the client disconnects (the body has been read: only that message is left)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _wait(result: asyncio.Future, generation: GenerationRequest, receive, deadline: Deadline):
    """``result``'s value; when the deadline passes (504) or the client leaves (499, which
    nobody reads), ``generation`` is cancelled: dropped from the queue if not started."""
    gone = asyncio.ensure_future(_client_gone(receive))
    try:
        finished, _ = await asyncio.wait({result, gone}, timeout=deadline.left(),
                                         return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if result in finished:
        return result.result()
    generation.cancel()
    result.cancel()
    if gone in finished:
        raise APIError("the client closed the connection", code="client_closed_request", status=499)
    raise deadline.error()


def _generation(chat: ChatRequest, on_text=None) -> GenerationRequest:
    return GenerationRequest(sample=chat.sample, max_tokens=chat.max_tokens, temperature=chat.temperature,
                             top_p=chat.top_p, stop=chat.stop, on_text=on_text)


def _usage(prompt_tokens: int, done: Completion) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": prompt_tokens + done.completion_tokens}


def _completion(chat: ChatRequest, prompt_tokens: int, done: Completion, completion_id: str, model_name: str) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": done.finish_reason}],
            "usage": _usage(prompt_tokens, done)}


async def _start_stream(engine: GenerationEngine, chat: ChatRequest, prompt_tokens: int, completion_id: str,
                        model_name: str, receive, deadline: Deadline) -> StreamingResponse:
    """Queue a streamed request and wait for its first piece of text (or its end) before the
    200 goes out, so that a timeout or a full queue is still an HTTP error."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    generation = _submit(engine, _generation(
        chat, on_text=lambda t: loop.call_soon_threadsafe(pieces.put_nowait, t)))
    generation.future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
    first = await _wait(asyncio.ensure_future(pieces.get()), generation, receive, deadline)
    return StreamingResponse(_stream(generation, pieces, first, completion_id, model_name, deadline),
                             media_type="text/event-stream")


async def _stream(generation: GenerationRequest, pieces: asyncio.Queue, first: Optional[str], completion_id: str,
                  model_name: str, deadline: Deadline) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; a client that
    leaves, or a deadline passed mid-stream (reported in-band), cancels the generation."""
    try:
        async for event in _events(generation, pieces, first, completion_id, model_name, deadline):
            yield event
    finally:
        if not generation.future.done():
            generation.cancel()


async def _events(generation: GenerationRequest, pieces: asyncio.Queue, first: Optional[str], completion_id: str,
                  model_name: str, deadline: Deadline) -> AsyncIterator[str]:
    future = generation.future
    created = int(time.time())

    def chunk(delta: dict, finish: Optional[str] = None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    def error(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    sent = ""
    piece = first
    while piece is not None:
        sent += piece
        yield chunk({"content": piece})
        try:
            piece = await asyncio.wait_for(pieces.get(), timeout=deadline.left())
        except asyncio.TimeoutError:  # the stream has started: report in-band, as OpenAI does
            generation.cancel()
            yield error(deadline.error().body())
            yield "data: [DONE]\n\n"
            return
    try:
        done = future.result()
        text = done.text
    except Exception as exc:  # the stream has started: report in-band, as OpenAI does
        logger.exception("streamed generation failed")
        yield error({"error": {"message": f"internal server error ({type(exc).__name__})", "type": "server_error",
                               "param": None, "code": None}})
        yield "data: [DONE]\n\n"
        return
    if text.startswith(sent) and len(text) > len(sent):
        yield chunk({"content": text[len(sent):]})
    elif not text.startswith(sent):
        logger.warning("streamed text %r is not a prefix of the answer %r", sent, text)
    yield chunk({}, done.finish_reason)
    yield "data: [DONE]\n\n"


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, image_root: Optional[str] = None,
          model_name: Optional[str] = None, max_batch_size: int = 8, template: Optional[str] = None,
          max_request_mb: float = 20.0, max_queue: int = 64, request_timeout_s: float = 300.0,
          shutdown_grace_s: float = 30.0) -> None:
    """Load a stage output and serve it until SIGTERM / SIGINT (then drain: :func:`run_server`)."""
    from vlm.checkpoint.pretrained import load_pretrained
    from vlm.modeling.processing import build_processor

    model, tokenizer, model_cfg = load_pretrained(checkpoint)
    engine = GenerationEngine(model, build_processor(model, tokenizer, model_cfg, template), max_batch_size,
                              max_queue=max_queue)
    app = create_app(engine, model_name or "vlm", image_root, max_request_mb=max_request_mb,
                     request_timeout_s=request_timeout_s)
    print(f"serving {checkpoint} on http://{host}:{port} (OpenAI API at /v1, web page at /, /metrics)", flush=True)
    run_server(app, engine, host=host, port=port, shutdown_grace_s=shutdown_grace_s)


def run_server(app: FastAPI, engine: GenerationEngine, host: str = "127.0.0.1", port: int = 8000,
               shutdown_grace_s: float = 30.0, log_level: str = "info") -> None:
    """Serve ``app`` (from :func:`create_app`) with uvicorn until SIGTERM or SIGINT, then drain:
    new chat requests get 503, those in flight are finished for up to ``shutdown_grace_s``, the
    worker ends, and this returns (the process exits 0). A second signal stops at once."""
    import uvicorn

    state: ServerState = app.state.serving

    class DrainingServer(uvicorn.Server):
        deadline = Deadline(0.0)

        def handle_exit(self, sig, frame) -> None:
            # uvicorn's own handler re-raises the signal after shutdown (exit status 143 / 130)
            if state.draining:
                self.should_exit = self.force_exit = True
                return
            state.start_draining()
            threading.Thread(target=self.drain, args=(signal.Signals(sig).name,), daemon=True).start()

        def drain(self, name: str) -> None:
            self.deadline = deadline = Deadline(shutdown_grace_s)
            logger.warning("%s: draining, new requests get 503; waiting up to %g s for %d request(s) in flight "
                           "(--shutdown-grace-s)", name, shutdown_grace_s, state.in_flight())
            if not state.wait_idle(shutdown_grace_s):
                logger.warning("%d request(s) still in flight after %g s: stopping anyway", state.in_flight(),
                               shutdown_grace_s)
            self.config.timeout_graceful_shutdown = max(0.5, deadline.left())
            self.should_exit = True

    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=shutdown_grace_s))
    server.run()
    engine.close()
    engine.worker.join(timeout=server.deadline.left())  # a daemon: what is left of the grace, no more
