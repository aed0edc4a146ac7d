"""Conversations about one video, the whole conversation resent every turn (as OpenAI clients and our page send it):
our engine with its caches, the same engine without them, and transformers' continuous batching, in one run.

    python bench/multiturn.py [--model smollm-vitb16|world|tiny] [--users 4] [--turns 5] [--answer 16] [--json out.json]

Model (random weights, fp32, CPU): a GPT4Video whose LLM has SmolLM2-135M's shape (vocab 49152, hidden 576, 30 layers,
9 heads, 3 KV heads) and whose tower has CLIP ViT-B/16's (768 wide, 12 layers, patch 16, 224 px), the paper's
abstractor (64 + 64 tokens, 6 layers) and 4 frames; ``--model world``: the world demo's shapes (``configs/world.yaml``,
a 256-token context: use at most 4 turns); ``--model tiny`` (or ``--tiny``): ``configs/model/tiny.yaml`` (what CI
runs).
Workload: ``--users`` users at once, each with its own video and system text; a turn is every user's next question
(12-20 tokens) submitted together, answered greedily with ``--answer`` new tokens (no EOS); the next turn's prompt is
the last prompt, the answer and the next question.

Paths:
- ``ours, caches``: ``Engine`` with the prefix cache and the video token cache (its defaults);
- ``ours, no caches``: ``prefix_cache=False, video_cache_mb=0``: every turn encodes the video and prefills all;
  its tokens are compared with the first path's, request by request;
- ``HF CB``: transformers' continuous batching (``allow_block_sharing``: its prefix sharing) on an
  ``LlamaForCausalLM`` of the same shape, its own random weights, the same prompt lengths (the video span as token
  ids), each user fed its own answers; at a user's first turn it runs HF's ``CLIPVisionModel`` of our tower's shape
  on the user's frames (the vision work ours does; the abstractor, which HF lacks, is left out: the peer does a
  little less), once per video, as an encoder cache would.
Reported per path: time to first token by turn (mean over users), turns >= 3 against the no-cache path, output
tokens/s over the whole run and over turns >= 2 (the conversation after the video is seen), and ours' prefix-cache
and video-cache counts. Compiles happen in a warm-up run first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from g4v_jax.config import EngineConfig, load_config  # noqa: E402
from g4v_jax.inference.engine import Engine, EngineRequest  # noqa: E402
from g4v_jax.inference.generate import SamplingConfig, pow2  # noqa: E402
from g4v_jax.models.gpt4video import build_model  # noqa: E402
from common import hf_cb_config  # noqa: E402

SMOLLM_VIT_B16 = [
    "model.llm.vocab_size=49152", "model.llm.hidden_size=576", "model.llm.intermediate_size=1536",
    "model.llm.num_layers=30", "model.llm.num_heads=9", "model.llm.num_kv_heads=3",
    "model.llm.max_position_embeddings=2048", "model.llm.tie_word_embeddings=true", "model.llm_hidden_size=576",
    "model.vision.hidden_size=768", "model.vision.intermediate_size=3072", "model.vision.num_layers=12",
    "model.vision.num_heads=12", "model.vision.patch_size=16", "model.vision.image_size=224",
    "model.abstractor.hidden_size=768", "model.abstractor.num_layers=6", "model.abstractor.num_query_tokens=64",
    "model.abstractor.num_temporal_tokens=64",
    "model.abstractor.num_heads=12", "model.abstractor.intermediate_size=2048", "model.param_dtype=float32",
    "model.compute_dtype=float32"]


def workload(users: int, turns: int, vocab: int, k: int, frames_shape, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(users):
        first = np.concatenate([rng.integers(3, vocab, 40), np.full(k, -1), rng.integers(3, vocab, 16)])
        video = (rng.integers(0, 255, frames_shape, dtype=np.uint8), np.ones(frames_shape[0], bool))
        questions = [rng.integers(3, vocab, int(rng.integers(12, 21))) for _ in range(turns - 1)]
        out.append((first.astype(np.int32), video, questions))
    return out


def run_ours(engine: Engine, conversations, answer: int) -> dict:
    """Every turn of every user; (per-turn TTFT lists, tokens, seconds)."""
    prompts = [c[0] for c in conversations]
    tokens: list[list[list[int]]] = [[] for _ in conversations]
    ttft: list[list[float]] = []
    ends = []
    t0 = time.perf_counter()
    for t in range(1 + len(conversations[0][2])):
        handles = []
        for u, (_, video, questions) in enumerate(conversations):
            if t:
                prompts[u] = np.concatenate([prompts[u], tokens[u][-1], questions[t - 1]]).astype(np.int32)
            handles.append(engine.submit(EngineRequest(prompts[u], [video], SamplingConfig(answer))))
        engine.run()
        results = [h.result() for h in handles]
        ttft.append([r.ttft for r in results])
        for u, r in enumerate(results):
            tokens[u].append(list(r.tokens))
        ends.append(time.perf_counter() - t0)
    return {"ttft": ttft, "tokens": tokens, "seconds": ends[-1], "turn_ends": ends}


def run_peer(manager, conversations, answer: int, tag: str, tower=None) -> dict:
    """transformers' continuous batching; ``tower(frames)`` runs at each user's first turn (its vision work)."""
    prompts = [np.where(c[0] < 0, 1, c[0]) for c in conversations]  # the video span as token ids
    tokens: list[list[list[int]]] = [[] for _ in conversations]
    ttft: list[list[float]] = []
    ends = []
    t0 = time.perf_counter()
    for t in range(1 + len(conversations[0][2])):
        submitted, first, ids = {}, {}, []
        for u, (_, video, questions) in enumerate(conversations):
            rid = f"{tag}-{t}-{u}"
            submitted[rid] = time.perf_counter()
            if t:
                prompts[u] = np.concatenate([prompts[u], tokens[u][-1], questions[t - 1]]).astype(np.int32)
            elif tower is not None:
                tower(video[0])
            manager.add_request(prompts[u].tolist(), request_id=rid, max_new_tokens=answer, streaming=True)
            ids.append(rid)
        done = {}
        while len(done) < len(ids):
            r = manager.get_result(timeout=1)
            if r is None:
                continue
            if r.request_id not in first and len(r.generated_tokens):
                first[r.request_id] = time.perf_counter()
            if r.is_finished():
                done[r.request_id] = list(r.generated_tokens)
        ttft.append([first[i] - submitted[i] for i in ids])
        for u, i in enumerate(ids):
            tokens[u].append(done[i])
        ends.append(time.perf_counter() - t0)
    return {"ttft": ttft, "tokens": tokens, "seconds": ends[-1], "turn_ends": ends}


def summary(name: str, run: dict, answer: int) -> dict:
    turns = [float(np.mean(t)) for t in run["ttft"]]
    generated = sum(len(a) for user in run["tokens"] for a in user)
    later = sum(len(a) for user in run["tokens"] for a in user[1:])
    return {"path": name, "ttft_by_turn_s": turns, "ttft_turns_3plus_s": float(np.mean(turns[2:])),
            "tokens_per_s": generated / run["seconds"], "seconds": run["seconds"],
            "tokens_per_s_turns_2plus": later / (run["seconds"] - run["turn_ends"][0])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--answer", type=int, default=16)
    ap.add_argument("--model", choices=("smollm-vitb16", "world", "tiny"), default="smollm-vitb16")
    ap.add_argument("--tiny", action="store_true", help="--model tiny")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, GenerationConfig, LlamaConfig, LlamaForCausalLM

    if args.tiny:
        args.model = "tiny"
    cfg = {"tiny": lambda: load_config("tiny").model, "world": lambda: load_config("world").model,
           "smollm-vitb16": lambda: load_config("tiny", SMOLLM_VIT_B16).model}[args.model]()
    model = build_model(cfg)
    k = cfg.num_video_tokens
    frames_shape = (cfg.num_frames, cfg.vision.image_size, cfg.vision.image_size, 3)
    conversations = workload(args.users, args.turns, cfg.llm.vocab_size, k, frames_shape)
    longest = 40 + k + 16 + (args.turns - 1) * (20 + args.answer) + args.answer
    engine_cfg = EngineConfig(num_slots=args.users, max_length=pow2(longest), min_bucket=32, prefill_chunk=512)
    results, runs = [], {}
    for name, overrides in (("ours, caches", {}), ("ours, no caches", {"prefix_cache": False, "video_cache_mb": 0})):
        engine = Engine(model, None, EngineConfig(**{**engine_cfg.__dict__, **overrides}), eos_id=-1)
        engine.warmup()
        run_ours(engine, workload(args.users, args.turns, cfg.llm.vocab_size, k, frames_shape, seed=9), args.answer)
        engine.stats.__init__()
        runs[name] = run_ours(engine, conversations, args.answer)
        results.append({**summary(name, runs[name], args.answer), "prefix_hit_tokens": engine.stats.prefix_hit_tokens,
                        "prefill_tokens": engine.stats.prefill_tokens, "encoded_videos": engine.stats.encoded_videos})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    same = sum(a == b for a, b in zip(runs["ours, caches"]["tokens"], runs["ours, no caches"]["tokens"]))
    llm = cfg.llm
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
                                      intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
                                      num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
                                      max_position_embeddings=llm.max_position_embeddings,
                                      tie_word_embeddings=llm.tie_word_embeddings, attn_implementation="sdpa")).eval()
    vis = cfg.vision
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=vis.hidden_size, intermediate_size=vis.intermediate_size,
                                            num_hidden_layers=vis.num_layers, num_attention_heads=vis.num_heads,
                                            patch_size=vis.patch_size, image_size=vis.image_size,
                                            hidden_act="quick_gelu")).eval()

    def tower(frames: np.ndarray):
        pixels = torch.from_numpy(frames).float().permute(0, 3, 1, 2) / 255.0
        return clip(pixel_values=pixels).last_hidden_state

    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=args.answer)
    cb = hf_cb_config(args.users, pow2(longest), allow_block_sharing=True)
    with torch.no_grad(), hf.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb,
                                                                  block=True, timeout=5) as manager:
        run_peer(manager, workload(args.users, args.turns, cfg.llm.vocab_size, k, frames_shape, seed=9), args.answer,
                 "warm", tower)
        results.append(summary("HF CB", run_peer(manager, conversations, args.answer, "timed", tower), args.answer))
    on, off, peer = results
    report = {"machine": platform.node(), "cpus": os.cpu_count(), "load": os.getloadavg(), "date":
              time.strftime("%Y-%m-%d %H:%M"), "model": {"tiny": "tiny", "world": "the world model's shapes (random)",
                                                        "smollm-vitb16": "SmolLM2-135M shape + ViT-B/16"}[args.model],
              "users": args.users, "turns": args.turns, "answer": args.answer, "video_tokens": k, "paths": results,
              "ttft_3plus_ratio": on["ttft_turns_3plus_s"] / off["ttft_turns_3plus_s"],
              "tokens_per_s_vs_hf": on["tokens_per_s"] / peer["tokens_per_s"],
              "tokens_per_s_turns_2plus_vs_hf": on["tokens_per_s_turns_2plus"] / peer["tokens_per_s_turns_2plus"],
              "conversations_identical": f"{same}/{args.users}"}
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def markdown(r: dict) -> str:
    lines = [f"{r['model']}, {r['users']} users x {r['turns']} turns, {r['answer']} new tokens a turn, "
             f"{r['video_tokens']} video tokens; {r['machine']} ({r['cpus']} CPUs), {r['date']}, load average "
             f"{r['load'][0]:.2f}", "",
             "| path | TTFT by turn (s) | TTFT turns >= 3 (s) | output tok/s | output tok/s, turns >= 2 | "
             "prefix-cache hit / computed prompt tokens | videos encoded |", "|---|---|---|---|---|---|---|"]
    for p in r["paths"]:
        cache = (f"{p['prefix_hit_tokens']} / {p['prefill_tokens']}" if "prefix_hit_tokens" in p else "—")
        lines.append(f"| {p['path']} | {' '.join(f'{t:.3f}' for t in p['ttft_by_turn_s'])} | "
                     f"{p['ttft_turns_3plus_s']:.3f} | {p['tokens_per_s']:.1f} | "
                     f"{p['tokens_per_s_turns_2plus']:.1f} | {cache} | "
                     f"{p.get('encoded_videos', '—')} |")
    lines += ["", f"TTFT on turns >= 3 with the caches: {r['ttft_3plus_ratio']:.2f}x without them; output tokens/s: "
                  f"{r['tokens_per_s_vs_hf']:.2f}x HF CB ({r['tokens_per_s_turns_2plus_vs_hf']:.2f}x on turns >= 2); "
                  "greedy tokens with = without the caches for "
                  f"{r['conversations_identical']} conversations."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
