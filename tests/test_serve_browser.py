"""The chat page of `vlm serve` in a real headless chromium (Debian's chromium + chromium-driver,
installed by `make test-browser`): two images and a question, the answer streamed in, a follow-up
that carries the first turn, a video, a refused request shown in one line, "New chat"; and the
docs screenshot (docs/img/serve_page.png).

Excluded from the default run (marker ``browser``); skipped when chromium or its driver is
missing, unless VLM_REQUIRE_BROWSER=1 (as `make test-browser` sets) makes that a failure.

The screenshot is taken with the tiny random model of the tests (kept under the test's tmp folder)
unless ``VLM_SCREENSHOT_CHECKPOINT`` names a stage output: then that model answers
``VLM_SCREENSHOT_QUESTIONS`` (separated by ``|``, the first one with the images) about
``VLM_SCREENSHOT_IMAGES`` (paths separated by ``os.pathsep``; default: two drawn shapes) and the
screenshot is written to docs/img/serve_page.png (docs/serving.md has the command).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import build_tiny_model, tiny_model_config
from test_serve import LiveServer

from vlm.data.types import Turn
from vlm.inference.chat import answer
from vlm.inference.serving.app import create_app
from vlm.inference.serving.engine import GenerationEngine
from vlm.modeling.processing import build_processor

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "serve_page.png"
QUESTIONS = ("are the shapes in the two images the same color?", "what color is the shape in the second image?")
MAX_TOKENS = 12
TOKEN_DELAY_S = 0.04  # per generated token, so that the stream arrives in visibly separate pieces
# records every text the last answer shows while it streams in
WATCH_ANSWER = """
window.seen = [];
new MutationObserver(() => {
  const shown = document.querySelector("#conversation .message.assistant:last-child .text");
  if (shown) window.seen.push(shown.textContent);
}).observe(document.getElementById("conversation"), {subtree: true, childList: true, characterData: true});
"""


def chromium_paths():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or shutil.which("chromium-driver")
    if (browser is None or driver is None) and os.environ.get("VLM_REQUIRE_BROWSER") != "1":
        pytest.skip("chromium / chromedriver not installed (make test-browser installs them)")
    assert browser and driver, "chromium and chromedriver are required (make test-browser)"
    return browser, driver


class RecordingApp:
    """An ASGI wrapper keeping the JSON body of every chat completion request the page sends."""

    def __init__(self, app):
        self.app = app
        self.bodies = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        chunks = []

        async def tee():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(b"".join(chunks)))
            return message

        await self.app(scope, tee, send)


def open_chrome(profile: Path, window: str = "900,800"):
    webdriver = pytest.importorskip("selenium.webdriver")
    browser, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS + [f"--window-size={window}", f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
    chrome.set_page_load_timeout(30)
    return chrome


def draw_shapes(folder: Path):
    """Two 64 px images in the style of `vlm data shapes`: a red circle, a blue square."""
    import numpy as np

    from vlm.data.synthetic import draw_shape

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for name, shape, color in (("first", "circle", "red"), ("second", "square", "blue")):
        attributes = {"shape": shape, "color": color, "center": [0.5, 0.5], "radius": 0.3, "background": 0}
        path = folder / f"{name}.png"
        draw_shape(attributes, 64, rng).save(path)
        paths.append(str(path))
    return paths


# --- driving the page -------------------------------------------------------------------------

def by_id(chrome, name):
    from selenium.webdriver.common.by import By

    return chrome.find_element(By.ID, name)


def wait(chrome, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(chrome, timeout).until(condition)


def set_field(chrome, name, value):
    """Type ``value`` into a field as a person does: a line break is Shift+Enter (Enter sends)."""
    from selenium.webdriver.common.keys import Keys

    field = by_id(chrome, name)
    field.clear()
    lines = str(value).split("\n")
    for i, line in enumerate(lines):
        field.send_keys(line)
        if i < len(lines) - 1:
            field.send_keys(Keys.SHIFT, Keys.ENTER)


def attach(chrome, name, paths, count):
    by_id(chrome, name).send_keys("\n".join(paths))
    wait(chrome, lambda d: len(d.find_elements("css selector", "#pending .thumb")) == count, 20)


def answers(chrome):
    return chrome.find_elements("css selector", "#conversation .message.assistant")


def ask(chrome, question):
    """Type ``question``, send it, and return the text the page shows once the answer is complete."""
    before = len(answers(chrome))
    set_field(chrome, "question", question)
    by_id(chrome, "send").click()
    wait(chrome, lambda d: len(answers(d)) == before + 1 and answers(d)[-1].get_attribute("data-done"))
    assert by_id(chrome, "error").text == ""
    return answers(chrome)[-1].find_element("css selector", ".text").get_attribute("textContent")


# --- the chat -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    from vlm.data.video import write_video

    tmp = tmp_path_factory.mktemp("chat_page")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = tiny_model_config(tokenizer_dir, template="chatml", image_placement="first", **{"video.num_frames": 3})
    model = build_tiny_model(cfg, tokenizer, seed=11)
    processor = build_processor(model, tokenizer, cfg)
    images = draw_shapes(tmp / "images")
    from PIL import Image

    video = str(tmp / "clip.webm")
    write_video(video, [Image.open(p).convert("RGB").resize((32, 32)) for p in images + images[:1]])
    model.llm.register_forward_pre_hook(lambda *_: time.sleep(TOKEN_DELAY_S))
    engine = GenerationEngine(model, processor)
    app = RecordingApp(create_app(engine, "tiny"))
    chrome = open_chrome(tmp / "profile")
    try:
        with LiveServer(app) as url:
            chrome.get(url + "/")
            wait(chrome, lambda d: by_id(d, "model").text == "tiny", 20)
            yield {"chrome": chrome, "app": app, "model": model, "processor": processor, "images": images,
                   "video": video, "url": url}
    finally:
        chrome.quit()
        engine.close()


def expected(chat, images, turns, videos=()):
    return answer(chat["model"], chat["processor"], list(images), turns, max_new_tokens=MAX_TOKENS,
                  videos=list(videos))


def file_uri(path: str, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def test_two_images_streamed_answer_and_a_follow_up_with_the_history(chat):
    chrome, bodies = chat["chrome"], chat["app"].bodies
    by_id(chrome, "new-chat").click()
    set_field(chrome, "temperature", 0)
    set_field(chrome, "top_p", 0.9)
    set_field(chrome, "max_tokens", MAX_TOKENS)
    attach(chrome, "images", chat["images"], 2)
    chrome.execute_script(WATCH_ANSWER)
    first = ask(chrome, QUESTIONS[0])
    a, b = chat["images"]
    turn = [Turn("user", f"<image>\n<image>\n{QUESTIONS[0]}")]
    assert first == expected(chat, [a, b], turn) and first
    # streamed: the page showed the answer growing, not only whole
    partial = {s for s in chrome.execute_script("return window.seen") if s and s != first}
    assert partial and all(first.startswith(s) for s in partial), partial
    # the conversation shows both images as thumbnails; the composer is empty again
    assert len(chrome.find_elements("css selector", "#conversation .message.user img.thumb")) == 2
    assert not chrome.find_elements("css selector", "#pending .thumb") and by_id(chrome, "question").text == ""
    body = bodies[-1]
    assert body["stream"] is True and (body["temperature"], body["top_p"], body["max_tokens"]) == (0, 0.9, MAX_TOKENS)
    parts = body["messages"][0]["content"]
    assert [p["image_url"]["url"] for p in parts[:2]] == [file_uri(a, "image/png"), file_uri(b, "image/png")]
    assert parts[2] == {"type": "text", "text": QUESTIONS[0]}

    second = ask(chrome, QUESTIONS[1])
    body = bodies[-1]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][0] == bodies[-2]["messages"][0] and body["messages"][1]["content"] == first
    assert body["messages"][2]["content"] == [{"type": "text", "text": QUESTIONS[1]}]
    assert second == expected(chat, [a, b], turn + [Turn("assistant", first), Turn("user", QUESTIONS[1])])


def test_a_video_in_a_message(chat):
    chrome, bodies = chat["chrome"], chat["app"].bodies
    by_id(chrome, "new-chat").click()
    set_field(chrome, "max_tokens", MAX_TOKENS)
    attach(chrome, "video", [chat["video"]], 1)
    shown = ask(chrome, "what happens in the clip?")
    assert chrome.find_elements("css selector", "#conversation .message.user video.thumb")
    parts = bodies[-1]["messages"][0]["content"]
    assert len(bodies[-1]["messages"]) == 1
    assert parts[0] == {"type": "video_url", "video_url": {"url": file_uri(chat["video"], "video/webm")}}
    assert shown == expected(chat, [], [Turn("user", "<video>\nwhat happens in the clip?")], [chat["video"]])


def test_a_refused_request_shows_one_error_line_and_keeps_the_turn(chat):
    chrome, bodies = chat["chrome"], chat["app"].bodies
    by_id(chrome, "new-chat").click()
    attach(chrome, "images", chat["images"], 2)
    set_field(chrome, "max_tokens", 4096)  # over the tiny model's context of 256
    set_field(chrome, "question", QUESTIONS[0])
    by_id(chrome, "send").click()
    wait(chrome, lambda d: by_id(d, "error").text)
    error = by_id(chrome, "error").text
    assert error.startswith("error 400: This model's maximum context length is 256 tokens") and "\n" not in error
    # nothing lost: no half turn in the conversation, the question and images back in the composer
    assert not chrome.find_elements("css selector", "#conversation .message")
    assert by_id(chrome, "question").get_attribute("value") == QUESTIONS[0]
    assert len(chrome.find_elements("css selector", "#pending .thumb")) == 2
    set_field(chrome, "max_tokens", MAX_TOKENS)
    by_id(chrome, "send").click()
    wait(chrome, lambda d: answers(d) and answers(d)[-1].get_attribute("data-done"))
    assert by_id(chrome, "error").text == ""
    assert len(bodies[-1]["messages"]) == 1 and len(bodies[-1]["messages"][0]["content"]) == 3



def test_stop_keeps_the_partial_answer_and_ends_the_generation(chat):
    chrome, bodies = chat["chrome"], chat["app"].bodies
    by_id(chrome, "new-chat").click()
    set_field(chrome, "max_tokens", 200)  # about 8 s at TOKEN_DELAY_S a token: stopped long before
    chrome.execute_script(WATCH_ANSWER)
    set_field(chrome, "question", QUESTIONS[0])
    by_id(chrome, "send").click()
    wait(chrome, lambda d: len([s for s in d.execute_script("return window.seen") if s]) >= 2)
    assert by_id(chrome, "send").text == "Stop"
    by_id(chrome, "send").click()
    wait(chrome, lambda d: answers(d)[-1].get_attribute("data-done"))
    kept = answers(chrome)[-1].find_element("css selector", ".text").get_attribute("textContent")
    assert kept and by_id(chrome, "status").text == "stopped" and by_id(chrome, "error").text == ""
    # the client left mid-stream: the server stopped generating
    metrics = httpx.get(chat["url"] + "/metrics", timeout=10).text
    assert float(re.search(r'vlm_requests_cancelled_total\{when="generating"\} (\S+)', metrics)[1]) >= 1
    set_field(chrome, "max_tokens", MAX_TOKENS)
    ask(chrome, QUESTIONS[1])
    assert [m["role"] for m in bodies[-1]["messages"]] == ["user", "assistant", "user"]
    assert bodies[-1]["messages"][1]["content"] == kept

# --- the docs screenshot ------------------------------------------------------------------------

def test_docs_screenshot(tmp_path, tokenizer_dir, tokenizer):
    """A two-image conversation for docs/serving.md; every answer the page shows is the server's
    own greedy answer to the conversation the page sent."""
    checkpoint = os.environ.get("VLM_SCREENSHOT_CHECKPOINT")
    if checkpoint:
        from vlm.checkpoint.pretrained import load_pretrained

        model, tokenizer, cfg = load_pretrained(checkpoint)
    else:
        cfg = tiny_model_config(tokenizer_dir, template="chatml", image_placement="first")
        model = build_tiny_model(cfg, tokenizer, seed=11)
    images = os.environ.get("VLM_SCREENSHOT_IMAGES")
    images = [os.path.abspath(p) for p in images.split(os.pathsep)] if images else draw_shapes(tmp_path / "images")
    questions = os.environ.get("VLM_SCREENSHOT_QUESTIONS")
    questions = [q.strip() for q in questions.split("|")] if questions else list(QUESTIONS)
    engine = GenerationEngine(model, build_processor(model, tokenizer, cfg))
    app = RecordingApp(create_app(engine, Path(checkpoint).parent.parent.name if checkpoint else "tiny"))
    chrome = open_chrome(tmp_path / "profile", window="900,1000")
    try:
        with LiveServer(app) as url:
            chrome.get(url + "/")
            set_field(chrome, "max_tokens", MAX_TOKENS)
            attach(chrome, "images", images, len(images))
            shown = [ask(chrome, question) for question in questions]
            by_id(chrome, "question").click()
            screenshot = tmp_path / "serve_page.png"
            assert chrome.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0
            for body, text in zip(app.bodies, shown):
                reply = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
                assert reply.json()["choices"][0]["message"]["content"] == text
    finally:
        chrome.quit()
        engine.close()
    if checkpoint:
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, DOCS_SCREENSHOT)
