"""The web page in a real headless browser (Debian's chromium, driven by Playwright): upload a video, see the frames
the model reads, ask, watch the answer stream in more than one piece, get a generated video that loads and plays,
reset; on a server started with an API key, the page asks for the key (a wrong one is refused) and sends it with
every call, the generated video included. The model's text comes from the scripted engine (a random model writes no <video> tags); everything else
(server, media checks, jobs, the world-free solid T2V backend, the page) is real."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripted_engine import script_engine  # noqa: E402
from test_server import Running, _server, world  # noqa: E402,F401  (the module fixture)

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.parametrize("api_key", [None, "k3y-for-the-page"], ids=["open", "api-key"])
def test_the_page_uploads_asks_streams_and_plays_the_generated_video(world, tmp_path, monkeypatch,  # noqa: F811
                                                                     api_key):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "the browser test needs Debian's chromium (.ci/run installs it: apt-get install chromium)"
    answer = " A red square moves to the right. Here it is: <video>a red square moves right</video>###"
    script_engine(monkeypatch, world["tokenizer"].encode(answer, add_special_tokens=False)
                  + [world["tokenizer"].eos_token_id])
    server = _server(world, tmp_path)
    if api_key:
        server.cfg = dataclasses.replace(server.cfg, api_key=api_key)
    running = Running(server)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 420, "height": 900})  # phone width
            page.goto(running.url + "/")
            if api_key:
                page.wait_for_selector("#keyform:not([hidden])")
                page.fill("#apikey", "a wrong key")
                page.click("#usekey")
                page.wait_for_selector("#model:has-text('that key was refused')")
                page.fill("#apikey", api_key)
                page.click("#usekey")
            page.wait_for_selector("#model:has-text('tiny')")
            assert page.locator("#keyform").is_hidden()
            assert page.locator("#pick option").count() > 1  # the media directory's videos are offered
            page.set_input_files("#file", str(world["media"] / "a.mp4"))
            page.wait_for_function("document.querySelectorAll('#frames img').length === 4")
            page.fill("#question", "What happens? Then make a video of it.")
            page.click("#send")
            page.wait_for_selector(".msg.ai[data-done='1']", timeout=60_000)
            box = page.locator(".msg.ai").first
            assert box.inner_text().startswith("A red square moves to the right. Here it is: <video>")
            assert int(box.get_attribute("data-pieces")) > 1  # streamed, not delivered at once
            page.wait_for_function("(() => { const v = document.querySelector('.job video');"
                                   " return v && v.readyState >= 2 && v.videoWidth > 0; })()", timeout=60_000)
            shot = tmp_path / "serve_page.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("G4V_UPDATE_SCREENSHOT") == "1" and not api_key:  # refresh the README's picture
                shutil.copy(shot, ROOT / "docs" / "serve_page.png")
            assert shot.stat().st_size > 10_000
            page.click("#reset")
            assert page.locator(".msg").count() == 0
            browser.close()
    finally:
        running.stop()
