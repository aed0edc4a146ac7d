"""The serving-hardening issue's table, re-run: hostile requests against ``python -m g4v_jax.serve`` in its own process,
each row's status, seconds and the server's resident memory (RSS now, and its peak so far) after it.

    python bench/serve_hostile.py [--ckpt DIR] [--out runs/hostile] [--slow-clients 60]

Without ``--ckpt`` a tiny random GPT4Video is saved and served (the rows test the server, not the model). The
server runs with ``--api-key`` (the key rows) and ``--body-timeout 10`` (the trickled bodies). The decompression
bombs are written here: 4 frames of 8192 x 8192 H.264 (tiny on disk) and one 16000 x 16000 PNG frame in a MOV.
Prints a markdown table; not a test (the suite's tests/serve/test_hostile.py checks the same rows on a small scale).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KEY = "bench-key"


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def post(port: int, body: bytes, content_type: str = "application/json", key: str | None = KEY,
         timeout: float = 300) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"content-type": content_type}
    if key:
        headers["authorization"] = f"Bearer {key}"
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        r = conn.getresponse()
        text = r.read().decode("utf-8", "replace")
        try:
            text = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            text = "ok" if r.status == 200 else text[:80]
        return r.status, text
    finally:
        conn.close()


def chat(content, **extra) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}).encode()


def video(url: str) -> bytes:
    return chat([{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}])


def bomb_h264(path: Path, size: int = 8192) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=4)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        s.options = {"preset": "ultrafast"}
        frame = av.VideoFrame(size, size, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        for i in range(4):
            frame.pts = i
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def bomb_png_mov(path: Path, size: int = 16000) -> Path:
    import av

    with av.open(str(path), "w", format="mov") as c:
        s = c.add_stream("png", rate=1)
        s.width = s.height = size
        s.pix_fmt = "gray"
        frame = av.VideoFrame.from_ndarray(np.zeros((size, size), np.uint8), format="gray")
        for packet in s.encode(frame):
            c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def data_url(path: Path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def trickle(port: int, seconds: float, size: int = 100_000) -> str:
    """A body of ``size`` bytes promised, a byte a second sent: what the server answers (or 'held')."""
    s = socket.create_connection(("127.0.0.1", port), timeout=seconds + 30)
    try:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: "
                  f"Bearer {KEY}\r\nContent-Length: {size}\r\n\r\n".encode())
        end = time.time() + seconds
        s.settimeout(1.0)
        while time.time() < end:
            try:
                got = s.recv(4096)
                return got.split(b"\r\n", 1)[0].decode() if got else "closed"
            except socket.timeout:
                s.sendall(b" ")
        return "held"
    except OSError as e:
        return f"closed ({type(e).__name__})"
    finally:
        s.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--out", default="runs/hostile")
    ap.add_argument("--slow-clients", type=int, default=60)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    media = out / "media"
    media.mkdir(exist_ok=True)
    from g4v_jax.data.video import synthetic_frames, write_video

    write_video(media / "clip.mp4", synthetic_frames(12, 48, 64, seed=1))
    ckpt = args.ckpt
    if ckpt is None:
        from g4v_jax.config import Config, load_config
        from g4v_jax.data.template import SYSTEM_PROMPT
        from g4v_jax.data.tokenizer import build_bpe_tokenizer
        from g4v_jax.models.gpt4video import build_model
        from g4v_jax.weights import save_pretrained

        cfg = load_config("tiny").model
        ckpt = out / "tiny"
        save_pretrained(build_model(cfg), Config(model=cfg), ckpt)
        build_bpe_tokenizer([SYSTEM_PROMPT, "###Human: What happens? ###AI: a red square moves."] * 8, ckpt,
                            vocab_size=cfg.llm.vocab_size)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "g4v_jax.serve", "--ckpt", str(ckpt), "--port", str(port),
                               "--api-key", KEY, "--body-timeout", "10", "--media-dir", str(media), "--output-dir",
                               str(out / "serve"), "--no-warmup"], cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while True:
            try:
                if post(port, chat("hello"))[0] == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, "the server did not start"
            time.sleep(0.5)
        h264, png = bomb_h264(out / "bomb8192.mp4"), bomb_png_mov(out / "bomb16000.mov")
        rows = [
            ('`"stop": ["x" * 40000]`', lambda: post(port, chat("hi", stop=["x" * 40000]))),
            ('`"stop": ["x" * 10000]`', lambda: post(port, chat("hi", stop=["x" * 10000]))),
            ('`"top_k": 2**31`', lambda: post(port, chat("hi", top_k=2**31, temperature=1.0))),
            ("`file://clip.mp4\\u0000.mp4`", lambda: post(port, video("file://clip.mp4\u0000.mp4"))),
            ("JSON arrays nested 100,000 deep", lambda: post(port, b"[" * 100_000 + b"]" * 100_000)),
            ("an object nested 100,000 deep in `content`", lambda: post(
                port, b'{"messages": [{"role": "user", "content": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000
                + b"}]}")),
            ('a lone surrogate (`"\\ud800"`)', lambda: post(port, b'{"messages": [{"role": "user", "content": '
                                                                  b'"a \\ud800"}]}')),
            ("1 MB of text", lambda: post(port, chat("red " * 250_000))),
            (f"8192x8192 H.264, {h264.stat().st_size // 1024} KB, 4 frames, as a data URL",
             lambda: post(port, video(data_url(h264)))),
            ("three of those at once", lambda: list(ThreadPoolExecutor(3).map(
                lambda _: post(port, video(data_url(h264))), range(3)))[0]),
            ("ten more of those, one after another", lambda: [post(port, video(data_url(h264)))
                                                              for _ in range(10)][-1]),
            (f"16000x16000 PNG-in-MOV, {png.stat().st_size // 1024} KB", lambda: post(port, video(data_url(png)))),
            ("no API key", lambda: post(port, chat("hi"), key=None)),
            ("a wrong API key", lambda: post(port, chat("hi"), key="guess")),
            ("`Content-Type: text/plain` with a JSON body", lambda: post(port, chat("hi"), "text/plain")),
            ('`"presence_penalty": 2`', lambda: post(port, chat("hi", presence_penalty=2))),
            ('`"model": "gpt-4"`', lambda: post(port, chat("hi", model="gpt-4"))),
        ]
        print("| request | status | answer | seconds | server RSS after / peak (MB) |\n|---|---|---|---|---|")
        for name, send in rows:
            t0 = time.time()
            status, text = send()
            took = time.time() - t0
            now, peak = rss_mb(server.pid)
            print(f"| {name} | {status} | {text[:110]} | {took:.2f} | {now:.0f} / {peak:.0f} |", flush=True)
        t0 = time.time()
        with ThreadPoolExecutor(args.slow_clients) as pool:
            answers = list(pool.map(lambda _: trickle(port, 40), range(args.slow_clients)))
        counts = {a: answers.count(a) for a in set(answers)}
        now, peak = rss_mb(server.pid)
        print(f"| {args.slow_clients} connections trickling a 100 KB body for up to 40 s | {counts} | | "
              f"{time.time() - t0:.1f} | {now:.0f} / {peak:.0f} |")
        status, _ = post(port, chat("hello"))
        print(f"\nafter all rows: a normal request -> {status}; server alive: {server.poll() is None}")
    finally:
        server.terminate()
        server.wait(timeout=60)
        print(f"server exit status on SIGTERM: {server.returncode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
