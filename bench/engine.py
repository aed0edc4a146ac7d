"""The continuous-batching engine beside one-by-one generation and static batches of 8, on one workload, one run.

    python bench/engine.py [--workload smollm|world|both] [--requests 64] [--one-by-one 16] [--json out.json]

Workloads (random weights; what is measured is the serving path, not the answers):
- ``smollm``: a SmolLM2-135M-shaped LLaMA (vocab 49152, hidden 576, 30 layers, 9 heads, 3 KV heads), text only.
- ``world``: the world demo's GPT4Video (``--world-ckpt``, default ``runs/world/stage2/final``) or, when absent, a
  random model of ``configs/world.yaml``'s shapes; a quarter of the requests carry a video.
Requests: prompts of 16-200 tokens, new-token budgets mixed between 8 and 256 (clipped to the model's context), all
arriving at t = 0; greedy, no EOS (each request runs to its budget, as a request of that length would).

Paths:
- ``engine``: ``g4v_jax.inference.Engine`` with 8 slots, refilling a slot as soon as its request is done.
- ``static8``: today's static batching: batches of 8 in arrival order through ``inference.stream``, each row
  decoding until the batch's longest budget is reached (the tokens past a row's budget are wasted).
- ``one_by_one``: ``inference.stream`` per request, on the first ``--one-by-one`` requests (a slow path: its rate is
  measured on that subset).

Every program a path needs is compiled before its timed run (compile count and seconds are reported from that
warm-up, through JAX's monitoring events); the timed runs must compile nothing. Reported per path: requests/s,
output tokens/s, time to first token p50/p99 (from t = 0: queueing included), inter-token latency p50/p99.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from g4v_jax.config import EngineConfig, load_config  # noqa: E402
from g4v_jax.inference.engine import Engine, EngineRequest  # noqa: E402
from g4v_jax.inference.generate import SamplingConfig, pow2, stream  # noqa: E402
from g4v_jax.models.gpt4video import build_model, language_model  # noqa: E402

SMOLLM = ["model.kind=llm", "model.llm.vocab_size=49152", "model.llm.hidden_size=576",
          "model.llm.intermediate_size=1536", "model.llm.num_layers=30", "model.llm.num_heads=9",
          "model.llm.num_kv_heads=3", "model.llm.max_position_embeddings=2048", "model.llm.tie_word_embeddings=true",
          "model.lora.enabled=false"]
SLOTS = 8
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class Compiles:
    """Backend compiles (count, seconds) while open."""

    def __init__(self):
        self.count, self.seconds = 0, 0.0

    def _listen(self, event, duration, **_):
        if event == COMPILE_EVENT:
            self.count += 1
            self.seconds += duration

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def load_workload(name: str, world_ckpt: str):
    if name == "smollm":
        return build_model(load_config("tiny", SMOLLM).model), "SmolLM2-135M-shaped LLaMA (random, fp32)"
    ckpt = Path(world_ckpt)
    if (ckpt / "config.yaml").is_file():
        import g4v_jax

        return g4v_jax.load(ckpt), f"world demo GPT4Video ({ckpt})"
    return build_model(load_config("world").model), "world-shaped GPT4Video (random, fp32)"


def make_requests(model, n: int, seed: int = 0) -> list[EngineRequest]:
    rng = np.random.default_rng(seed)
    lm = language_model(model)
    vision = hasattr(model, "encode_videos")
    k = model.cfg.num_video_tokens if vision else 0
    out = []
    for i in range(n):
        with_video = vision and i % 4 == 3
        longest = min(200, lm.cfg.max_position_embeddings // 2)  # the world model's context is 256
        text = int(rng.integers(16, longest + 1 - (k if with_video else 0)))
        ids = rng.integers(3, lm.cfg.vocab_size, text).astype(np.int32)
        videos = []
        if with_video:
            ids = np.concatenate([ids[:3], np.full(k, -1, np.int32), ids[3:]])
            t, s = model.cfg.num_frames, model.cfg.vision.image_size
            videos = [(rng.integers(0, 255, (t, s, s, 3), dtype=np.uint8), np.ones(t, bool))]
        budget = min(int(rng.integers(8, 257)), lm.cfg.max_position_embeddings - len(ids))
        out.append(EngineRequest(ids, videos, SamplingConfig(budget), id=i))
    return out


def _static_batches(model, requests, size):
    """(batch dict, SamplingConfig, rows) per static batch: the batch's longest budget rounded up to a power of two,
    left-padded to a power-of-two length, both clamped to the context (``ChatSession``'s rule; few programs)."""
    context = language_model(model).cfg.max_position_embeddings
    out = []
    for start in range(0, len(requests), size):
        rows = requests[start:start + size]
        longest = max(len(r.prompt_ids) for r in rows)
        budget = min(pow2(max(r.sampling.max_new_tokens for r in rows)), context - longest)
        length = min(max(64, pow2(longest)), context - budget)
        ids = np.zeros((len(rows), length), np.int32)
        mask = np.zeros((len(rows), length), bool)
        for b, r in enumerate(rows):
            ids[b, length - len(r.prompt_ids):] = r.prompt_ids
            mask[b, length - len(r.prompt_ids):] = True
        batch = {"input_ids": ids, "attention_mask": mask}
        if any(r.videos for r in rows):
            first = next(r.videos[0] for r in rows if r.videos)
            videos = np.zeros((len(rows), 1, *first[0].shape), np.uint8)
            fmask = np.zeros((len(rows), 1, first[1].shape[0]), bool)
            for b, r in enumerate(rows):
                if r.videos:
                    videos[b, 0], fmask[b, 0] = r.videos[0]
            batch["videos"], batch["frame_mask"] = videos, fmask
        out.append((batch, SamplingConfig(budget), rows))
    return out


def run_stream_path(model, requests, size):
    """Static batches through ``stream``: token timestamps per request (only its first ``budget`` tokens count)."""
    times = {r.id: [] for r in requests}
    t0 = time.perf_counter()
    for batch, cfg, rows in _static_batches(model, requests, size):
        for step, _ in enumerate(stream(model, batch, cfg, eos_id=-1)):
            now = time.perf_counter() - t0
            for r in rows:
                if step < r.sampling.max_new_tokens:
                    times[r.id].append(now)
    return time.perf_counter() - t0, times


def warm_stream(model, requests, size):
    with Compiles() as c:
        seen = set()
        for batch, cfg, rows in _static_batches(model, requests, size):
            key = (batch["input_ids"].shape, cfg, "videos" in batch)
            if key not in seen:
                seen.add(key)
                next(iter(stream(model, batch, cfg, eos_id=-1)))
                it = stream(model, batch, cfg, eos_id=-1)
                next(it), next(it)  # the step program too
    return c


def engine_path(model, requests, prefill_chunk: int = 512):
    cfg = EngineConfig(num_slots=SLOTS, max_length=pow2(max(len(r.prompt_ids) + r.sampling.max_new_tokens
                                                              for r in requests)),
                       min_bucket=32, max_queue=len(requests), prefill_chunk=prefill_chunk)
    engine = Engine(model, None, cfg, eos_id=-1)
    with Compiles() as warm:
        engine.warmup()
    with Compiles() as timed:
        t0 = time.perf_counter()
        handles = [engine.submit(r) for r in requests]
        engine.run()
        wall = time.perf_counter() - t0
    times = {h.request.id: [t - t0 for t in h.result().token_times] for h in handles}
    # submit stamps are within microseconds of t0: TTFT below is measured from t0 for every path
    return wall, times, warm, timed, engine


def summarize(name, wall, times, warm, timed):
    ttft = [v[0] for v in times.values()]
    itl = [b - a for v in times.values() for a, b in zip(v, v[1:])]
    tokens = sum(len(v) for v in times.values())
    return {"path": name, "requests": len(times), "wall_s": wall, "req_per_s": len(times) / wall,
            "out_tok_per_s": tokens / wall, "output_tokens": tokens,
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "itl_p50_ms": 1e3 * float(np.percentile(itl, 50)), "itl_p99_ms": 1e3 * float(np.percentile(itl, 99)),
            "compiles": warm.count, "compile_s": warm.seconds, "timed_compiles": timed.count}


def bench(workload: str, args) -> dict:
    model, label = load_workload(workload, args.world_ckpt)
    requests = make_requests(model, args.requests)
    print(f"\n## {workload}: {label}; {len(requests)} requests, "
          f"{sum(r.sampling.max_new_tokens for r in requests)} output tokens, "
          f"{sum(bool(r.videos) for r in requests)} with a video", flush=True)
    rows = []
    for chunk in args.prefill_chunks:
        wall, times, warm, timed, engine = engine_path(model, requests, chunk)
        rows.append(summarize(f"engine (8 slots, prefill chunk {chunk})", wall, times, warm, timed))
        rows[-1]["slot_occupancy"] = engine.stats.slot_steps / max(1, engine.stats.steps * SLOTS)
        print(json.dumps(rows[-1]), flush=True)
    if args.engine_only:
        return {"workload": workload, "model": label, "rows": rows}
    warm = warm_stream(model, requests, SLOTS)
    with Compiles() as timed:
        wall, times = run_stream_path(model, requests, SLOTS)
    rows.append(summarize("static batches of 8", wall, times, warm, timed))
    print(json.dumps(rows[-1]), flush=True)
    subset = requests[:args.one_by_one]
    warm = warm_stream(model, subset, 1)
    with Compiles() as timed:
        wall, times = run_stream_path(model, subset, 1)
    rows.append(summarize(f"one by one (first {len(subset)})", wall, times, warm, timed))
    print(json.dumps(rows[-1]), flush=True)
    return {"workload": workload, "model": label, "rows": rows}


def markdown(result: dict) -> str:
    head = ("| path | req/s | out tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | compiles (s) | vs engine tok/s |\n"
            "|---|---|---|---|---|---|---|\n")
    engine_rate = result["rows"][0]["out_tok_per_s"]  # the first engine row (its default prefill chunk)
    lines = []
    for r in result["rows"]:
        lines.append(f"| {r['path']} | {r['req_per_s']:.2f} | {r['out_tok_per_s']:.1f} | "
                     f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | {r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f} | "
                     f"{r['compiles']} ({r['compile_s']:.1f}) | {engine_rate / r['out_tok_per_s']:.2f}× |")
    return f"### {result['model']}\n\n" + head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=("smollm", "world", "both"), default="both")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--one-by-one", type=int, default=16)
    ap.add_argument("--world-ckpt", default="runs/world/stage2/final")
    ap.add_argument("--json", default="")
    ap.add_argument("--prefill-chunks", default="512,32",
                    help="the engine path once per prefill chunk size (prompt tokens between two decode steps)")
    ap.add_argument("--engine-only", action="store_true", help="skip the static-batch and one-by-one paths")
    args = ap.parse_args()
    args.prefill_chunks = [int(c) for c in args.prefill_chunks.split(",") if c.strip()]
    print(f"# bench/engine.py: {platform.node()}, {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}")
    results = [bench(w, args) for w in (("world", "smollm") if args.workload == "both" else (args.workload,))]
    for r in results:
        print("\n" + markdown(r))
        assert all(row["timed_compiles"] == 0 for row in r["rows"]), "a timed run compiled"
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
