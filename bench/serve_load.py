"""Load on the OpenAI-compatible server: 1, 4 and 16 concurrent clients on loopback, the server's own metrics beside.

    python bench/serve_load.py [--ckpt runs/world/stage2/final] [--requests 64] [--max-seconds 120] [--turns N]

Starts ``g4v_jax.serve`` on a free 127.0.0.1 port in this process (engine warmed up first: compile time is not
load), then for each concurrency level sends ``--requests`` streamed chat completions through the official
``openai`` client, each client one request at a time: half ask about one of the world's test videos (``file://``),
half ask for a video; ``max_tokens`` 48, greedy. Bounded in count and in time (a level stops sending after
``--max-seconds``). Reports requests/s, time to first token (first content chunk) and latency p50/p99, and the
server's ``/metrics`` for the level (slot occupancy, TTFT histogram mean). Loopback only; not a timed test.

``--turns N``: conversations instead: 1, then 4 users at once, each asking about one of the world's test videos and
then N - 1 follow-up questions (24 new tokens at most a turn: the world model's context is 256 tokens, 3 turns fit), the
whole history resent every turn; reports TTFT by turn and what the server's
caches saved (prefix-cache hit against computed prompt tokens, videos encoded, decodes saved).
"""

from __future__ import annotations

import argparse
import functools
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


@functools.lru_cache(maxsize=4)
def served(client) -> str:
    """The model the server serves (another name is a 404)."""
    return client.models.list().data[0].id


def one_request(client, i: int, videos: list[str]) -> tuple[float, float, int]:
    if i % 2 == 0 and videos:
        content = [{"type": "video_url", "video_url": {"url": f"file://{videos[i % len(videos)]}"}},
                   {"type": "text", "text": ["What colour is the circle?", "How many objects are there?",
                                             "Describe the video."][i % 3]}]
    else:
        content = "Show me a video of a big red square moving right on a gray background."
    t0 = time.perf_counter()
    first, n = None, 0
    for chunk in client.chat.completions.create(model=served(client), messages=[{"role": "user", "content": content}],
                                                max_tokens=48, temperature=0, stream=True):
        for c in chunk.choices:
            if c.delta.content and first is None:
                first = time.perf_counter() - t0
            n += bool(c.delta.content)
    return first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0, n


FOLLOW_UPS = ["What colour is it?", "How many objects are there?", "What shape is it?", "And the background?",
              "Describe the video."]


def conversation(client, i: int, videos: list[str], turns: int) -> list[tuple[float, float, int]]:
    """One user's conversation about one video, the whole history resent every turn (as OpenAI clients do): the
    (TTFT, latency, chunks) of each turn."""
    messages = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"file://{videos[i % len(videos)]}"}},
        {"type": "text", "text": "What happens in this video?"}]}]
    out = []
    for t in range(turns):
        t0 = time.perf_counter()
        first, n, text = None, 0, []
        for chunk in client.chat.completions.create(model=served(client), messages=messages, max_tokens=24,
                                                    temperature=0, stream=True):
            for c in chunk.choices:
                if c.delta.content:
                    first = time.perf_counter() - t0 if first is None else first
                    n += 1
                    text.append(c.delta.content)
        out.append((first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0, n))
        messages += [{"role": "assistant", "content": "".join(text) or "ok"},
                     {"role": "user", "content": FOLLOW_UPS[(i + t) % len(FOLLOW_UPS)]}]
    return out


def conversations_level(url: str, clients: int, turns: int, videos: list[str]) -> dict:
    """``clients`` users at once, each one conversation of ``turns`` turns: TTFT by turn, and the caches' counts."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    before = metrics(url)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda i: conversation(client, i, videos, turns), range(clients)))
    wall = time.perf_counter() - t0
    after = metrics(url)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    return {"clients": clients, "turns": turns, "wall_s": wall,
            "ttft_by_turn_s": [float(np.mean([r[t][0] for r in runs])) for t in range(turns)],
            "prefix_hit_tokens": delta("g4v_prefix_cache_hit_tokens_total"),
            "prefill_tokens": delta("g4v_prefill_tokens_total"), "encoded_videos": delta("g4v_encoded_videos_total"),
            "decoded_video_cache_hits": delta("g4v_decoded_video_cache_hits_total"),
            "server_tokens": delta("g4v_generation_tokens_total")}


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
    ap.add_argument("--turns", type=int, default=0, help="instead: conversations of this many turns over one video "
                                                           "each, 1 and 4 users at once")
    args = ap.parse_args()
    if not (Path(args.ckpt) / "config.yaml").is_file():
        sys.exit(f"bench/serve_load.py: no model at {args.ckpt}; run `python3 dev.py demo` first or pass --ckpt")
    import jax

    server, uv, url, video_dir = start(args)
    videos = sorted(p.name for p in video_dir.glob("test-*.mp4"))[:16] if video_dir.is_dir() else []
    print(f"# bench/serve_load.py: {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.slots} slots, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, {url}", flush=True)
    if args.turns:
        levels, header, row = (1, 4), CONVERSATION_HEADER, conversation_row

        def measure(clients):
            return conversations_level(url, clients, args.turns, videos)
    else:
        levels, header, row = (1, 4, 16), LOAD_HEADER, load_row

        def measure(clients):
            return level(url, clients, args.requests, args.max_seconds, videos)
    rows = []
    for clients in levels:
        rows.append(measure(clients))
        print(json.dumps(rows[-1]), flush=True)
    print("\n" + header)
    for r in rows:
        print(row(r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    uv.should_exit = True


LOAD_HEADER = ("| clients | requests | req/s | TTFT p50 / p99 (s) | latency p50 / p99 (s) | server TTFT mean (s) | "
               "tokens |\n|---|---|---|---|---|---|---|")
CONVERSATION_HEADER = ("| users | turns | TTFT by turn (s) | prefix-cache hit / computed prompt tokens | videos encoded | "
                       "decodes saved | wall (s) |\n|---|---|---|---|---|---|---|")


def load_row(r: dict) -> str:
    return (f"| {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | {r['ttft_p50_s']:.3f} / "
            f"{r['ttft_p99_s']:.3f} | {r['latency_p50_s']:.3f} / {r['latency_p99_s']:.3f} | "
            f"{r['server_ttft_mean_s']:.3f} | {int(r['server_tokens'])} |")


def conversation_row(r: dict) -> str:
    return (f"| {r['clients']} | {r['turns']} | {' '.join(f'{t:.3f}' for t in r['ttft_by_turn_s'])} | "
            f"{int(r['prefix_hit_tokens'])} / {int(r['prefill_tokens'])} | {int(r['encoded_videos'])} | "
            f"{int(r['decoded_video_cache_hits'])} | {r['wall_s']:.1f} |")

if __name__ == "__main__":
    main()
