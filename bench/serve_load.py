"""Load on the OpenAI-compatible server: 1, 4 and 16 concurrent clients on loopback, the server's own metrics beside.

    python bench/serve_load.py [--ckpt runs/world/stage2/final] [--requests 64] [--max-seconds 120]

Starts ``g4v_jax.serve`` on a free 127.0.0.1 port in this process (engine warmed up first: compile time is not
load), then for each concurrency level sends ``--requests`` streamed chat completions through the official
``openai`` client, each client one request at a time: half ask about one of the world's test videos (``file://``),
half ask for a video; ``max_tokens`` 48, greedy. Bounded in count and in time (a level stops sending after
``--max-seconds``). Reports requests/s, time to first token (first content chunk) and latency p50/p99, and the
server's ``/metrics`` for the level (slot occupancy, TTFT histogram mean). Loopback only; not a timed test.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def start(args):
    import uvicorn

    from g4v_jax.serve.__main__ import build_server, parse_args
    from g4v_jax.serve.app import create_app

    ckpt = Path(args.ckpt)
    world = ckpt.parents[1] if len(ckpt.parents) > 1 else ckpt
    sargs = parse_args(["--ckpt", str(ckpt), "--t2v", "world", "--media-dir", str(world / "data" / "videos"),
                        "--output-dir", str(Path(args.out)), "--slots", str(args.slots)]
                       + (["--detector", str(world / "detector")] if (world / "detector").is_dir() else []))
    server = build_server(sargs)
    server.engine.warmup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning"))
    threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not uv.started:
        time.sleep(0.05)
    return server, uv, f"http://127.0.0.1:{sock.getsockname()[1]}", world / "data" / "videos"


def one_request(client, i: int, videos: list[str]) -> tuple[float, float, int]:
    if i % 2 == 0 and videos:
        content = [{"type": "video_url", "video_url": {"url": f"file://{videos[i % len(videos)]}"}},
                   {"type": "text", "text": ["What colour is the circle?", "How many objects are there?",
                                             "Describe the video."][i % 3]}]
    else:
        content = "Show me a video of a big red square moving right on a gray background."
    t0 = time.perf_counter()
    first, n = None, 0
    for chunk in client.chat.completions.create(model="world", messages=[{"role": "user", "content": content}],
                                                max_tokens=48, temperature=0, stream=True):
        for c in chunk.choices:
            if c.delta.content and first is None:
                first = time.perf_counter() - t0
            n += bool(c.delta.content)
    return first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0, n


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in urllib.request.urlopen(url + "/metrics").read().decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def level(url: str, clients: int, n: int, max_seconds: float, videos: list[str]) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    before = metrics(url)
    deadline = time.perf_counter() + max_seconds
    results = []

    def worker(k: int):
        for i in range(k, n, clients):
            if time.perf_counter() > deadline:
                return
            results.append(one_request(client, i, videos))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - t0
    after = metrics(url)
    ttft = [r[0] for r in results]
    lat = [r[1] for r in results]

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    return {"clients": clients, "requests": len(results), "wall_s": wall, "req_per_s": len(results) / wall,
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99)),
            "server_ttft_mean_s": delta("g4v_time_to_first_token_seconds_sum")
            / max(1.0, delta("g4v_time_to_first_token_seconds_count")),
            "server_tokens": delta("g4v_generation_tokens_total")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="runs/world/stage2/final")
    ap.add_argument("--out", default="/tmp/g4v_serve_load")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=120)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if not (Path(args.ckpt) / "config.yaml").is_file():
        sys.exit(f"bench/serve_load.py: no model at {args.ckpt}; run `python3 dev.py demo` first or pass --ckpt")
    import jax

    server, uv, url, video_dir = start(args)
    videos = sorted(p.name for p in video_dir.glob("test-*.mp4"))[:16] if video_dir.is_dir() else []
    print(f"# bench/serve_load.py: {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.slots} slots, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, {url}", flush=True)
    rows = []
    for clients in (1, 4, 16):
        rows.append(level(url, clients, args.requests, args.max_seconds, videos))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| clients | requests | req/s | TTFT p50 / p99 (s) | latency p50 / p99 (s) | server TTFT mean (s) | "
          "tokens |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | {r['ttft_p50_s']:.3f} / "
              f"{r['ttft_p99_s']:.3f} | {r['latency_p50_s']:.3f} / {r['latency_p99_s']:.3f} | "
              f"{r['server_ttft_mean_s']:.3f} | {int(r['server_tokens'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    uv.should_exit = True


if __name__ == "__main__":
    main()
