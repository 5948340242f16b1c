"""`vlm serve` with several images and a video per message, by the official openai client, and the
model's recorded image placement applied to a text-first request."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from conftest import build_tiny_model, tiny_model_config, write_images
from openai import OpenAI
from test_serve import LiveServer, data_uri

from vlm.data.types import Turn
from vlm.data.video import write_video
from vlm.inference.chat import answer
from vlm.inference.serving.app import create_app
from vlm.inference.serving.engine import GenerationEngine
from vlm.modeling.processing import build_processor

QUESTION = "what color is the shape?"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer_dir):
    from PIL import Image
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("serve_multi")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = tiny_model_config(tokenizer_dir, template="chatml", image_placement="first",
                            **{"video.num_frames": 3})
    model = build_tiny_model(cfg, tokenizer, seed=5)
    processor = build_processor(model, tokenizer, cfg)
    images = write_images(tmp / "root", sizes=[(40, 32), (32, 48), (32, 32)])
    write_video(str(tmp / "root" / "clip.mp4"), [Image.open(p).convert("RGB").resize((32, 32)) for p in images])
    engine = GenerationEngine(model, processor, max_batch_size=4)
    with LiveServer(create_app(engine, "tiny", image_root=tmp / "root")) as url:
        yield {"url": url, "model": model, "processor": processor, "images": images,
               "video": str(tmp / "root" / "clip.mp4")}
    engine.close()


def _client(served) -> OpenAI:
    return OpenAI(base_url=served["url"] + "/v1", api_key="unused", timeout=60, max_retries=0)


def _image(url):
    return {"type": "image_url", "image_url": {"url": url}}


def test_two_images_in_one_message_answer_as_vlm_chat(served):
    a, b = served["images"][:2]
    expected = answer(served["model"], served["processor"], [a, b], [Turn("user", f"<image>\n<image>\n{QUESTION}")],
                      max_new_tokens=MAX_TOKENS)
    content = [_image(data_uri(a)), _image(Path(b).name), {"type": "text", "text": QUESTION}]
    reply = _client(served).chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                                    max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == expected and expected
    # both images reach the model, in part order: 2 x 16 visual tokens
    assert reply.usage.prompt_tokens > 32
    # the model records "first": a text part before the images gives the same prompt
    text_first = [{"type": "text", "text": QUESTION}, _image(data_uri(a)), _image(data_uri(b))]
    reply = _client(served).chat.completions.create(model="tiny", messages=[{"role": "user", "content": text_first}],
                                                    max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == expected


def test_a_video_as_a_data_uri_or_a_file_under_the_image_root(served):
    video = served["video"]
    expected = answer(served["model"], served["processor"], [], [Turn("user", f"<video>\n{QUESTION}")],
                      max_new_tokens=MAX_TOKENS, videos=[video])
    uri = "data:video/mp4;base64," + base64.b64encode(Path(video).read_bytes()).decode()
    api = _client(served)
    for url in (uri, Path(video).name):
        content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": QUESTION}]
        reply = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                            max_tokens=MAX_TOKENS, temperature=0)
        assert reply.choices[0].message.content == expected and expected
        assert reply.usage.prompt_tokens > 3 * 4  # 3 frames x 4 pooled tokens


def test_an_undecodable_video_is_one_400_naming_it(served):
    import httpx

    bad = "data:video/mp4;base64," + base64.b64encode(b"not a video").decode()
    content = [{"type": "video_url", "video_url": {"url": bad}}, {"type": "text", "text": QUESTION}]
    response = httpx.post(served["url"] + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": content}], "max_tokens": 3})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_video" and "cannot use the video" in error["message"]
    assert "\n" not in error["message"] and "Traceback" not in response.text
