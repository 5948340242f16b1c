"""`vlm serve` refuses what the model cannot take and sheds load: context 400, body 413, full
queue 503 + Retry-After, timeout 504, a client that leaves frees its slot, /metrics, SIGTERM drain.

The worker is held inside generation by a :class:`Gate` (threading events), so what is queued,
running or cancelled at each step is known, never guessed from timing."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import build_tiny_model, tiny_model_config, write_images
from prometheus_client.parser import text_string_to_metric_families
from test_serve import LiveServer, data_uri, free_port, messages

from vlm.data.types import Sample, Turn
from vlm.inference.serving import engine as engine_module
from vlm.inference.serving.app import create_app
from vlm.inference.serving.engine import GenerationEngine, GenerationRequest
from vlm.inference.serving.limits import completion_budget
from vlm.inference.serving.requests import APIError
from vlm.modeling.processing import build_processor

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 256  # conftest's LLM_ARCH max_position_embeddings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = tiny_model_config(tokenizer_dir, template="chatml")
    model = build_tiny_model(cfg, tokenizer, seed=11)
    image = write_images(tmp_path_factory.mktemp("limits"), sizes=[(32, 32)])[0]
    return {"model": model, "processor": build_processor(model, tokenizer, cfg), "image": data_uri(image)}


@contextlib.contextmanager
def serving(tiny, max_batch_size: int = 8, max_queue: int = 64, **app_kwargs):
    """A live server on a fresh engine; the engine is closed and its worker joined after."""
    engine = GenerationEngine(tiny["model"], tiny["processor"], max_batch_size=max_batch_size, max_queue=max_queue)
    try:
        with LiveServer(create_app(engine, "tiny", **app_kwargs)) as url:
            yield url, engine
    finally:
        engine.close()
        engine.worker.join(timeout=30)


class Gate:
    """Holds the worker inside ``generate_answers`` until the block ends (or ``opened`` is
    set); ``questions`` lists what reached generation, ``entered`` is set when it is held."""

    def __init__(self, monkeypatch):
        self.entered, self.opened = threading.Event(), threading.Event()
        self.questions = []
        real = engine_module.generate_answers

        def held(model, processor, samples, **kwargs):
            self.questions += [s.turns[-1].content.split("\n")[-1] for s in samples]
            self.entered.set()
            assert self.opened.wait(30), "the test never opened the gate"
            return real(model, processor, samples, **kwargs)

        monkeypatch.setattr(engine_module, "generate_answers", held)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.opened.set()


def ask(url: str, tiny, question: str, max_tokens=4, timeout: float = 30) -> httpx.Response:
    body = {"messages": messages(tiny["image"], question)}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)


def error_of(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def raw_exchange(url: str, head: bytes, body: bytes, close_after: bool = False):
    """Send ``head`` and ``body`` on a socket; the response's status and JSON (None with
    ``close_after``: the socket is closed at once, the client gone)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    sock.sendall(head + body)
    if close_after:
        return sock
    data = b""
    with sock:
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        header, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in header.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            rest += sock.recv(65536)
    return int(header.split()[1]), json.loads(rest[:length])


def request_head(url: str, extra: str) -> bytes:
    host = url.removeprefix("http://")
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"{extra}\r\n").encode()


def test_prompt_over_the_context_is_a_400_naming_both_numbers(tiny):
    processor = tiny["processor"]
    question, prompt = "", 0
    while prompt < CONTEXT - 8:  # a long question: a few tokens are left for the answer
        question += "what color is the shape? "
        turns = processor.prompt_turns([Turn("user", f"<image>\n{question}")])
        prompt = len(processor.tokenize(turns, add_generation_prompt=True)[0])
    ids = processor.tokenize(turns, add_generation_prompt=True)[0]
    assert prompt < CONTEXT and ids.count(processor.image_token_id) == processor.num_image_tokens > 1
    with serving(tiny) as (url, engine):
        response = ask(url, tiny, question, max_tokens=CONTEXT - prompt + 1)
        assert response.status_code == 400, response.text
        error = error_of(response)
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert error["message"].startswith(
            f"This model's maximum context length is {CONTEXT} tokens. However, you requested {CONTEXT + 1} tokens "
            f"({prompt} in the messages, {CONTEXT - prompt + 1} in the completion).")
        assert engine.stats.batches == 0 and engine.waiting() == 0, "refused before it was queued"
        assert ask(url, tiny, question, max_tokens=CONTEXT - prompt).status_code == 200
    # without max_tokens the default (256) is lowered to what the context leaves; a prompt that
    # fills the context is refused either way
    assert completion_budget(prompt, 256, given=False, context=CONTEXT) == CONTEXT - prompt
    with pytest.raises(APIError, match=f"requested {CONTEXT + 1} tokens"):
        completion_budget(CONTEXT, 256, given=False, context=CONTEXT)
    assert completion_budget(10 ** 6, 7, given=True, context=None) == 7


def test_body_over_the_limit_is_a_413_without_reading_it(tiny):
    with serving(tiny, max_request_mb=0.01) as (url, engine):  # 10485 bytes
        # a Content-Length over the limit: answered before the body (never sent) is read
        status, body = raw_exchange(url, request_head(url, f"Content-Length: {10 ** 9}\r\n"), b'{"messages": [')
        assert status == 413 and body["error"]["code"] == "request_too_large"
        assert f"{10 ** 9} bytes" in body["error"]["message"] and "10485 bytes" in body["error"]["message"]
        # a chunked body: answered once the bytes read pass the limit, the rest never sent
        chunk = b"x" * 4096
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3))
        status, body = raw_exchange(url, request_head(url, "Transfer-Encoding: chunked\r\n"), chunks)
        assert status == 413 and "at least 12288 bytes" in body["error"]["message"]
        # under the limit it is answered
        assert ask(url, tiny, "what color?").status_code == 200


def test_full_queue_is_a_503_with_retry_after(tiny, monkeypatch):
    with serving(tiny, max_batch_size=1, max_queue=1) as (url, engine), Gate(monkeypatch) as gate, \
            ThreadPoolExecutor(2) as pool:
        first = pool.submit(ask, url, tiny, "first")
        assert gate.entered.wait(20)  # the worker holds "first"; the queue is empty
        waiting = GenerationRequest(Sample(id="w", turns=[Turn("user", "waiting")]), max_tokens=2)
        engine.submit(waiting)  # the one free slot
        response = ask(url, tiny, "refused")
        assert response.status_code == 503, response.text
        assert error_of(response)["code"] == "queue_full" and int(response.headers["Retry-After"]) >= 1
        waiting.cancel()  # a cancelled request frees its slot at once
        assert engine.waiting() == 0
        second = pool.submit(ask, url, tiny, "second")
        gate.opened.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert gate.questions == ["first", "second"] and waiting.future.cancelled()


def test_timeout_is_a_504_and_the_work_is_dropped(tiny, monkeypatch):
    with serving(tiny, max_batch_size=1, request_timeout_s=0.5) as (url, engine), Gate(monkeypatch) as gate, \
            ThreadPoolExecutor(1) as pool:
        running = pool.submit(ask, url, tiny, "running")
        assert gate.entered.wait(20)
        queued = ask(url, tiny, "queued")  # waits behind "running", then times out
        assert queued.status_code == 504, queued.text
        assert error_of(queued)["code"] == "timeout" and "0.5 s" in error_of(queued)["message"]
        assert running.result().status_code == 504  # its time ran out while it was generating
        assert engine.waiting() == 0 and engine.stats.cancelled_queued == 1
        gate.opened.set()
    # "queued" never reached generation; the generation of "running", abandoned, was stopped
    assert gate.questions == ["running"]
    assert engine.stats.cancelled_generating == 1 and engine.stats.generated_tokens == 0


def test_client_disconnect_frees_its_slot_and_is_not_generated(tiny, monkeypatch):
    with serving(tiny, max_batch_size=1) as (url, engine), Gate(monkeypatch) as gate, \
            ThreadPoolExecutor(1) as pool:
        submitted: "queue.Queue[GenerationRequest]" = queue.Queue()
        submit = engine.submit

        def recording_submit(request):
            future = submit(request)
            submitted.put(request)
            return future

        monkeypatch.setattr(engine, "submit", recording_submit)
        first = pool.submit(ask, url, tiny, "first")
        assert gate.entered.wait(20) and submitted.get(timeout=20)
        body = json.dumps({"messages": messages(tiny["image"], "gone"), "max_tokens": 4}).encode()
        sock = raw_exchange(url, request_head(url, f"Content-Length: {len(body)}\r\n"), body, close_after=True)
        gone = submitted.get(timeout=20)  # queued behind "first"
        assert engine.waiting() == 1
        cancelled = threading.Event()  # (concurrent.futures.wait does not wake on a cancel)
        gone.future.add_done_callback(lambda _: cancelled.set())
        sock.close()
        assert cancelled.wait(20) and gone.future.cancelled() and engine.waiting() == 0
        gate.opened.set()
        assert first.result().status_code == 200
    assert gate.questions == ["first"] and engine.stats.cancelled_queued == 1


def metric_samples(url: str) -> dict:
    response = httpx.get(url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_count_the_requests_made(tiny):
    with serving(tiny, max_request_mb=0.05) as (url, engine):
        before = metric_samples(url)
        assert before[("vlm_queue_depth", ())] == 0 and before[("vlm_generated_tokens_total", ())] == 0
        ok = ask(url, tiny, "what color?")
        assert ok.status_code == 200
        assert ask(url, tiny, "what color?", max_tokens=0).status_code == 400
        assert httpx.post(url + "/v1/chat/completions", content=b" " * 60000, timeout=10).status_code == 413
        samples = metric_samples(url)
    assert samples[("vlm_requests_total", (("code", "200"),))] == 1
    assert samples[("vlm_requests_total", (("code", "400"),))] == 1
    assert samples[("vlm_requests_total", (("code", "413"),))] == 1
    assert samples[("vlm_request_latency_seconds_count", ())] == 3
    assert samples[("vlm_generated_tokens_total", ())] == ok.json()["usage"]["completion_tokens"] > 0
    assert samples[("vlm_generation_seconds_total", ())] > 0
    assert samples[("vlm_queue_depth", ())] == 0 and samples[("vlm_requests_in_flight", ())] == 0
    assert samples[("vlm_requests_cancelled_total", (("when", "queued"),))] == 0


CHILD = """
import logging, sys
sys.path[:0] = [{tests!r}, {root!r}]
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from transformers import AutoTokenizer
from conftest import build_tiny_model, tiny_model_config
from vlm.inference.serving import engine as engine_module
from vlm.inference.serving.app import create_app, run_server
from vlm.inference.serving.engine import GenerationEngine
from vlm.modeling.processing import build_processor

real = engine_module.generate_answers

def held(*args, **kwargs):  # generation waits for a line on stdin
    print("GENERATING", flush=True)
    sys.stdin.readline()
    return real(*args, **kwargs)

engine_module.generate_answers = held
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
cfg = tiny_model_config(sys.argv[1], template="chatml")
model = build_tiny_model(cfg, tokenizer, seed=11)
engine = GenerationEngine(model, build_processor(model, tokenizer, cfg))
run_server(create_app(engine, "tiny"), engine, port=int(sys.argv[2]), shutdown_grace_s=20)
print("RETURNED", flush=True)
"""


def test_sigterm_drains_in_flight_requests_then_exits_0(tiny, tokenizer_dir, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(tests=str(ROOT / "tests"), root=str(ROOT))))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    child = subprocess.Popen([sys.executable, str(script), str(tokenizer_dir), str(port)], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in child.stdout], daemon=True).start()
    seen = []

    def expect(text: str) -> None:
        while not any(text in line for line in seen):
            try:
                seen.append(lines.get(timeout=60))
            except queue.Empty:
                raise AssertionError(f"no {text!r} from the server; it wrote:\n{''.join(seen)}") from None

    try:
        expect("Uvicorn running on")
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(ask, url, tiny, "in flight")
            expect("GENERATING")
            child.send_signal(signal.SIGTERM)
            expect("draining")
            assert httpx.get(url + "/health", timeout=10).status_code == 503
            refused = ask(url, tiny, "too late")
            assert refused.status_code == 503 and error_of(refused)["code"] == "server_shutting_down"
            assert int(refused.headers["Retry-After"]) >= 1
            child.stdin.write("go\n")
            child.stdin.flush()
            answered = in_flight.result()
        assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["content"] is not None
        assert child.wait(timeout=30) == 0
        expect("RETURNED")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_serve_flags_and_their_defaults(capsys):
    from vlm.app.cli import build_parser, main

    args = build_parser().parse_args(["serve", "ckpt"])
    assert (args.host, args.max_request_mb, args.max_queue, args.request_timeout_s, args.shutdown_grace_s) == (
        "127.0.0.1", 20.0, 64, 300.0, 30.0)
    for flag, value in (("--max-queue", "0"), ("--max-request-mb", "0"), ("--request-timeout-s", "-1"),
                        ("--shutdown-grace-s", "-1")):
        with pytest.raises(SystemExit) as info:
            main(["serve", "ckpt", flag, value])
        assert info.value.code == 2 and flag in capsys.readouterr().err
