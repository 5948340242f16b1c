"""The FastAPI app of ``vlm serve``: OpenAI's chat completions and models, /health, a web page.

Errors are OpenAI-style JSON (``{"error": {"message", "type", "param", "code"}}``): 400 for a
bad request, 500 (logged, no traceback in the body) for a server failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlm.inference.serving.engine import Completion, GenerationEngine, GenerationRequest
from vlm.inference.serving.requests import APIError, ChatRequest, parse_chat_request

logger = logging.getLogger(__name__)


def _error(status: int, message: str, kind: str, code: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def create_app(engine: GenerationEngine, model_name: str = "vlm", image_root: Optional[str | Path] = None) -> FastAPI:
    """The app serving ``engine``'s model as ``model_name``; local image paths only under
    ``image_root`` (None: refused)."""
    root = Path(image_root).resolve() if image_root else None
    app = FastAPI(title="vlm serve", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

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
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "vlm"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("vlm.inference.serving").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(f"the request body is not valid JSON: {exc}")
        # decoding images is CPU work: off the event loop
        chat = await asyncio.to_thread(parse_chat_request, body, root)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            return StreamingResponse(_stream(engine, chat, completion_id, model_name),
                                     media_type="text/event-stream")
        done = await asyncio.wrap_future(engine.submit(_generation(chat)))
        return _completion(engine, chat, done, completion_id, model_name)

    return app


def _generation(chat: ChatRequest, on_text=None) -> GenerationRequest:
    return GenerationRequest(sample=chat.sample, max_tokens=chat.max_tokens, temperature=chat.temperature,
                             top_p=chat.top_p, stop=chat.stop, on_text=on_text)


def _usage(engine: GenerationEngine, chat: ChatRequest, done: Completion) -> dict:
    processor = engine.processor
    prompt = len(processor.tokenize(processor.prompt_turns(chat.sample.turns), add_generation_prompt=True)[0])
    return {"prompt_tokens": prompt, "completion_tokens": done.completion_tokens,
            "total_tokens": prompt + done.completion_tokens}


def _completion(engine, chat: ChatRequest, done: Completion, completion_id: str, model_name: str) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": done.finish_reason}],
            "usage": _usage(engine, chat, done)}


async def _stream(engine: GenerationEngine, chat: ChatRequest, completion_id: str,
                  model_name: str) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    future = engine.submit(_generation(chat, on_text=lambda t: loop.call_soon_threadsafe(pieces.put_nowait, t)))
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
    created = int(time.time())

    def chunk(delta: dict, finish: Optional[str] = None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    sent = ""
    while True:
        piece = await pieces.get()
        if piece is None:
            break
        sent += piece
        yield chunk({"content": piece})
    try:
        done = future.result()
        text = done.text
    except Exception as exc:  # the stream has started: report in-band, as OpenAI does
        logger.exception("streamed generation failed")
        yield f"data: {json.dumps({'error': {'message': f'internal server error ({type(exc).__name__})', 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
        yield "data: [DONE]\n\n"
        return
    if text.startswith(sent) and len(text) > len(sent):
        yield chunk({"content": text[len(sent):]})
    elif not text.startswith(sent):
        logger.warning("streamed text %r is not a prefix of the answer %r", sent, text)
    yield chunk({}, done.finish_reason)
    yield "data: [DONE]\n\n"


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, image_root: Optional[str] = None,
          model_name: Optional[str] = None, max_batch_size: int = 8, template: Optional[str] = None) -> None:
    """Load a stage output and serve it until interrupted."""
    import uvicorn

    from vlm.checkpoint.pretrained import load_pretrained
    from vlm.modeling.processing import build_processor

    model, tokenizer, model_cfg = load_pretrained(checkpoint)
    engine = GenerationEngine(model, build_processor(model, tokenizer, model_cfg, template), max_batch_size)
    app = create_app(engine, model_name or "vlm", image_root)
    print(f"serving {checkpoint} on http://{host}:{port} (OpenAI API at /v1, web page at /)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
