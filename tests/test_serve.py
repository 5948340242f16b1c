"""`vlm serve` against a live server on 127.0.0.1: the official openai client gets `vlm chat`'s
greedy text, streamed or not; concurrent requests all answer; bad requests get OpenAI-style 400s."""

from __future__ import annotations

import base64
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import build_tiny_model, tiny_model_config, write_images
from openai import BadRequestError, OpenAI
from PIL import Image

from vlm.data.types import Turn
from vlm.inference.chat import answer
from vlm.inference.serving.app import create_app
from vlm.inference.serving.engine import GenerationEngine, TextDeltaStreamer
from vlm.modeling.processing import build_processor

QUESTION = "what color is the shape?"
MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


class LiveServer:
    """uvicorn serving ``app`` in a thread on a free loopback port."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("serve")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = tiny_model_config(tokenizer_dir, template="chatml")
    model = build_tiny_model(cfg, tokenizer, seed=11)
    processor = build_processor(model, tokenizer, cfg)
    images = write_images(tmp / "root", sizes=[(40, 32), (32, 48)])
    outside = write_images(tmp / "outside", sizes=[(32, 32)])[0]
    engine = GenerationEngine(model, processor, max_batch_size=8)
    with LiveServer(create_app(engine, "tiny", image_root=tmp / "root")) as url:
        yield {"url": url, "model": model, "processor": processor, "images": images, "outside": outside}
    engine.close()


def expected_answer(served, image) -> str:
    return answer(served["model"], served["processor"], image, [Turn("user", f"<image>\n{QUESTION}")],
                  max_new_tokens=MAX_TOKENS)


def messages(image_url: str, question: str = QUESTION):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": question}]}]


def client(served) -> OpenAI:
    return OpenAI(base_url=served["url"] + "/v1", api_key="unused", timeout=60, max_retries=0)


def test_openai_client_gets_vlm_chats_greedy_answer(served):
    api = client(served)
    assert [m.id for m in api.models.list().data] == ["tiny"]
    image = served["images"][0]
    expected = expected_answer(served, image)
    reply = api.chat.completions.create(model="tiny", messages=messages(data_uri(image)), max_tokens=MAX_TOKENS,
                                        temperature=0)
    assert reply.choices[0].message.content == expected and expected
    assert reply.choices[0].message.role == "assistant" and reply.usage.prompt_tokens > 16
    # a path under --image-root is the same image
    by_path = api.chat.completions.create(model="tiny", messages=messages(Path(image).name), max_tokens=MAX_TOKENS)
    assert by_path.choices[0].message.content == expected


def test_streamed_answer_reassembles_to_the_same_text(served):
    image = served["images"][1]
    expected = expected_answer(served, image)
    stream = client(served).chat.completions.create(model="tiny", messages=messages(data_uri(image)),
                                                    max_tokens=MAX_TOKENS, temperature=0, stream=True)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == expected
    assert sum(1 for p in pieces if p) >= 2, "the answer arrives in pieces"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with httpx.stream("POST", served["url"] + "/v1/chat/completions", timeout=60,
                      json={"messages": messages(data_uri(image)), "max_tokens": 4, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_twenty_concurrent_requests_all_answer(served):
    images = served["images"]
    expected = [expected_answer(served, image) for image in images]
    api = client(served)

    def ask(i):
        reply = api.chat.completions.create(model="tiny", messages=messages(data_uri(images[i % 2])),
                                            max_tokens=MAX_TOKENS, temperature=0)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(ask, range(20)))
    assert answers == [expected[i % 2] for i in range(20)]


def test_sampling_settings_and_stop_are_honoured(served):
    image = data_uri(served["images"][0])
    api = client(served)
    greedy = expected_answer(served, served["images"][0])
    stop = greedy[len(greedy) // 2:][:2]
    cut = api.chat.completions.create(model="tiny", messages=messages(image), max_tokens=MAX_TOKENS, stop=[stop])
    assert cut.choices[0].message.content == greedy.split(stop, 1)[0].strip()
    sampled = api.chat.completions.create(model="tiny", messages=messages(image), max_tokens=MAX_TOKENS,
                                          temperature=1.5, top_p=0.9)
    assert isinstance(sampled.choices[0].message.content, str)
    short = api.chat.completions.create(model="tiny", messages=messages(image), max_tokens=2)
    assert short.usage.completion_tokens <= 2 and short.choices[0].finish_reason in ("stop", "length")
    if short.usage.completion_tokens == 2:
        assert short.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body,param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0].role"),
    ({"messages": "BAD_IMAGE"}, "messages[0].content[0].image_url"),
    ({"messages": "OUTSIDE"}, "messages[0].content[0].image_url"),
    ({"messages": "REMOTE"}, "messages[0].content[0].image_url"),
    ({"messages": "NOT_BASE64"}, "messages[0].content[0].image_url"),
    ({"messages": "OK", "max_tokens": 0}, "max_tokens"),
    ({"messages": "OK", "max_tokens": "ten"}, "max_tokens"),
    ({"messages": "OK", "max_tokens": 10 ** 9}, "max_tokens"),
    ({"messages": "OK", "temperature": -1}, "temperature"),
    ({"messages": "OK", "top_p": 0}, "top_p"),
    ({"messages": "OK", "stop": [1, 2]}, "stop"),
    ({"messages": "OK", "n": 3}, "n"),
    ({"messages": [{"role": "user", "content": "<image> what?"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0]"),
])
def test_bad_requests_get_openai_style_400s(served, body, param):
    ok = data_uri(served["images"][0])
    urls = {"BAD_IMAGE": "data:image/png;base64," + base64.b64encode(b"not a png").decode(),
            "OUTSIDE": served["outside"], "REMOTE": "https://example.com/cat.png",
            "NOT_BASE64": "data:image/png;base64,@@@", "OK": ok}
    if isinstance(body.get("messages"), str):
        body = {**body, "messages": messages(urls[body["messages"]])}
    response = httpx.post(served["url"] + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and "Traceback" not in response.text


def test_bad_json_and_unknown_routes_are_json_errors(served):
    response = httpx.post(served["url"] + "/v1/chat/completions", content=b"{not json", timeout=10,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert httpx.get(served["url"] + "/v1/nothing", timeout=10).json()["error"]["type"] == "not_found_error"
    with pytest.raises(BadRequestError):
        client(served).chat.completions.create(model="tiny", messages=[], max_tokens=3)


def test_health_and_page(served):
    assert httpx.get(served["url"] + "/health", timeout=10).json()["status"] == "ok"
    page = httpx.get(served["url"] + "/", timeout=10)
    assert page.status_code == 200 and 'id="images"' in page.text and "/v1/chat/completions" in page.text


def test_page_loads_nothing_from_outside(served):
    """The server binds to loopback: the chat page works offline (no CDN, no external fetch)."""
    import re

    page = httpx.get(served["url"] + "/", timeout=10).text
    assert not re.search(r"<[a-z][^>]*\s(src|href)\s*=|@import|url\(|<link\b|https?://", page)


def test_processor_takes_pil_images_as_paths(served, tmp_path):
    processor = served["processor"]
    path = served["images"][0]
    with Image.open(path) as image:
        image.load()
    assert processor.load_image(image).equal(processor.load_image(path))


def test_stream_holds_back_what_the_answer_will_not_keep():
    sent = []

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(PIECES[i] for i in ids)

    PIECES = [" hel", "lo ", "wor", "ld<", "|im", "_end|>", "x"]
    streamer = TextDeltaStreamer(Tok(), ["<|im_end|>"], sent.append)
    import torch

    streamer.put(torch.zeros(1, 0, dtype=torch.long))  # the (empty) prompt
    for i in range(len(PIECES)):
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(sent) == "hello world" and sent[0] == "hel"


def test_serve_binds_loopback_by_default():
    from vlm.app.cli import build_parser

    args = build_parser().parse_args(["serve", "ckpt"])
    assert (args.host, args.port, args.image_root) == ("127.0.0.1", 8000, None)


def test_serve_refuses_a_missing_image_root_and_checkpoint(tmp_path, capsys):
    from vlm.app.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", str(tmp_path), "--image-root", str(tmp_path / "nowhere")])
    assert info.value.code == 2 and "--image-root" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["serve", str(tmp_path / "no_checkpoint")])
    assert info.value.code == 2
