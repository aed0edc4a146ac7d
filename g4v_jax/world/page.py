"""The paper's chat in the web page: a trained world model behind the real server, driven in headless Chromium.

    python -m g4v_jax.world.page [--run runs/world] [--model-dir runs/world/smollm2] [--video test-00000.mp4]
        [--question "What colour is the circle?"] [--request "Show me a video of ..."] [--shot page.png]

Starts ``python -m g4v_jax.serve`` on the model (``MODEL_DIR/stage2/final``; ``--model-dir`` defaults to ``--run``)
with the run's world renderer, input detector and test videos, opens the page in Debian's Chromium (through
Playwright), picks the video from the page's list, asks the question, then asks for a video in the same chat, waits
for the rendered video to play, and prints both answers, the video job's outcome and the video's true caption as
JSON (also ``MODEL_DIR/report/page.json``, with a screenshot). What a person sees, step by step, scripted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence

from g4v_jax.data.io import iter_jsonl

DEFAULT_QUESTION = "What colour is the circle?"
DEFAULT_REQUEST = "Show me a video of a big red triangle spinning on a gray background."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it answered")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer within {timeout_s:.0f} s")


def drive_page(url: str, video: str, question: str, request: str, shot: Path | None, timeout_s: float = 600) -> dict:
    """The page at ``url``: pick ``video`` (a name in its list), ask ``question``, then ``request``; the answers."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise RuntimeError("needs Debian's chromium (apt-get install chromium; python3 dev.py test installs it)")
    ms = int(timeout_s * 1000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 1100})
            page.goto(url + "/")
            page.wait_for_selector(f"#pick option[value='{video}']", state="attached", timeout=ms)
            page.select_option("#pick", video)
            page.wait_for_function("document.querySelectorAll('#frames img').length > 0", timeout=ms)
            answers = []
            for k, text in enumerate((question, request), start=1):
                page.fill("#question", text)
                page.click("#send")
                page.wait_for_function(f"document.querySelectorAll(\".msg.ai[data-done='1']\").length >= {k}",
                                       timeout=ms)
                answers.append(page.locator(".msg.ai").nth(k - 1))
            texts = [a.evaluate("e => e.firstChild ? e.firstChild.textContent : ''") for a in answers]
            job = None
            if answers[1].locator(".job").count():
                page.wait_for_function("(() => { const j = document.querySelectorAll('.msg.ai')[1]"
                                       ".querySelector('.job'); return j && !/rendering|^$/.test(j.textContent) })()",
                                       timeout=ms)
                line = answers[1].locator(".job").first
                job = {"text": line.evaluate("e => e.firstChild ? e.firstChild.textContent : e.textContent"),
                       "video_plays": line.locator("video").count() > 0}
            if shot is not None:
                page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    return {"question": question, "answer": texts[0], "request": request, "reply": texts[1], "video_job": job}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/world", help="a finished demo run (its world, detector and videos)")
    ap.add_argument("--model-dir", default=None, help="whose stage2/final to serve (default: --run; "
                    "runs/world/smollm2 for the SmolLM2 run)")
    ap.add_argument("--video", default="test-00000.mp4", help="a video of the run's data/videos")
    ap.add_argument("--question", default=DEFAULT_QUESTION)
    ap.add_argument("--request", default=DEFAULT_REQUEST)
    ap.add_argument("--timeout", type=float, default=600, help="seconds for the server to start and for each step")
    args = ap.parse_args(argv)
    run = Path(args.run)
    model_dir = Path(args.model_dir) if args.model_dir else run
    ckpt = model_dir / "stage2" / "final"
    videos = run / "data" / "videos"
    for need in (ckpt, run / "detector", videos):
        if not need.is_dir():
            ap.error(f"{need} not found: run python -m g4v_jax.world.demo first")
    if not (videos / args.video).is_file():
        ap.error(f"--video {args.video}: no such video in {videos}")
    captions = {Path(r["video"]).name: r["caption"] for _, r in iter_jsonl(run / "data" / "catalogue.jsonl")}
    report = model_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "g4v_jax.serve", "--ckpt", str(ckpt), "--t2v", "world",
                             "--detector", str(run / "detector"), "--media-dir", str(videos),
                             "--output-dir", str(model_dir / "serve"), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_up(url, proc, args.timeout)
        result = drive_page(url, args.video, args.question, args.request, report / "page.png", args.timeout)
    except RuntimeError as e:
        print(f"g4v_jax.world.page: error: {e}", file=sys.stderr)
        return 2
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    result = {"video": args.video, "caption": captions.get(args.video), **result, "screenshot": str(report / "page.png")}
    (report / "page.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
