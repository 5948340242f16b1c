"""The web page of `vlm serve` in a real headless chromium (Debian's chromium + chromium-driver,
installed by `make test-browser`): upload an image, ask, see the model's answer; keep a screenshot.

Excluded from the default run (marker ``browser``); skipped when chromium or its driver is
missing, unless VLM_REQUIRE_BROWSER=1 (as `make test-browser` sets) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import build_tiny_model, tiny_model_config
from test_serve import QUESTION, LiveServer

from vlm.data.types import Turn
from vlm.inference.chat import answer
from vlm.inference.serving.app import create_app
from vlm.inference.serving.engine import GenerationEngine
from vlm.modeling.processing import build_processor

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=900,800"]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "serve_page.png"


def chromium_paths():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or shutil.which("chromium-driver")
    if (browser is None or driver is None) and os.environ.get("VLM_REQUIRE_BROWSER") != "1":
        pytest.skip("chromium / chromedriver not installed (make test-browser installs them)")
    assert browser and driver, "chromium and chromedriver are required (make test-browser)"
    return browser, driver


def test_page_uploads_an_image_and_shows_the_answer(tmp_path, tokenizer_dir, tokenizer):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver = chromium_paths()
    cfg = tiny_model_config(tokenizer_dir, template="chatml")
    model = build_tiny_model(cfg, tokenizer, seed=11)
    processor = build_processor(model, tokenizer, cfg)
    from PIL import Image, ImageDraw

    image_path = tmp_path / "shape.png"
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse([16, 16, 48, 48], fill="red")
    image.save(image_path)
    expected = answer(model, processor, str(image_path), [Turn("user", f"<image>\n{QUESTION}")], max_new_tokens=256)

    engine = GenerationEngine(model, processor)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    with LiveServer(create_app(engine, "tiny")) as url:
        chrome = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
        try:
            chrome.set_page_load_timeout(30)
            chrome.get(url + "/")
            chrome.find_element(By.ID, "image").send_keys(str(image_path))
            WebDriverWait(chrome, 20).until(
                lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/"))
            question = chrome.find_element(By.ID, "question")
            question.clear()
            question.send_keys(QUESTION)
            chrome.find_element(By.ID, "ask").click()
            WebDriverWait(chrome, 60).until(lambda d: d.find_element(By.ID, "answer").get_attribute("data-done"))
            shown = chrome.find_element(By.ID, "answer")
            screenshot = tmp_path / "serve_page.png"
            assert chrome.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0
            DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(screenshot, DOCS_SCREENSHOT)
            assert "error" not in (shown.get_attribute("class") or ""), shown.text
            assert shown.text == expected.strip() and shown.text
        finally:
            chrome.quit()
            engine.close()
