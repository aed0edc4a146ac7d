"""The engine: every request at t = 0, mixed prompts and budgets, our ``Engine`` beside transformers' own continuous
batching (paged attention), the same number of slots."""

from __future__ import annotations

import numpy as np

from common import Context, Suite, hf_cb_config, timed, timed_result

ORDER = 30  # where the group's rows stand in the table


def rows(ctx: Context) -> list[dict]:
    hf, ours = ctx.models()
    return [engine_row(ctx.suite, hf, ours)]


def engine_requests(suite: Suite, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    w = suite.engine
    return [(rng.integers(3, suite.llm["vocab_size"], int(rng.integers(w["prompt"][0], w["prompt"][1] + 1))
                          ).astype(np.int32), int(rng.integers(w["budget"][0], w["budget"][1] + 1)))
            for _ in range(w["requests"])]


def engine_row(suite: Suite, hf, ours) -> dict:
    """Every request at t = 0, greedy, no EOS: our ``Engine`` beside transformers' continuous batching
    (``continuous_batching_context_manager``, paged attention, at most as many requests per batch as our slots).
    One timed run each after a warm-up run; tokens compared request by request."""
    import torch
    from transformers import GenerationConfig

    from g4v_jax.config import EngineConfig
    from g4v_jax.inference.engine import Engine, EngineRequest
    from g4v_jax.inference.generate import SamplingConfig, pow2

    work = engine_requests(suite)
    slots = suite.engine["slots"]
    length = pow2(max(len(p) + b for p, b in work))
    engine = Engine(ours, None, EngineConfig(num_slots=slots, max_length=length, min_bucket=32, max_queue=len(work)),
                    eos_id=-1)
    first = timed(engine.warmup)

    def run_ours():
        handles = [engine.submit(EngineRequest(p, [], SamplingConfig(b), id=i)) for i, (p, b) in enumerate(work)]
        engine.run()
        return [list(h.result().tokens) for h in handles]

    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=suite.engine["budget"][1])
    cb = hf_cb_config(slots, length)

    run_ours()  # warm-up, as the peer's below
    t_ours, ours_tokens = timed_result(run_ours)
    # one manager for the warm-up and the timed run: its start-up (cache sizing, warm-up) is not the workload, as
    # our engine's warmup() is not; ours ran first, so that the manager's thread never competes with it
    with torch.no_grad(), hf.continuous_batching_context_manager(
            generation_config=gen, continuous_batching_config=cb, block=True, timeout=5) as manager:

        def run_peer(tag: str):
            ids = [manager.add_request(p.tolist(), request_id=f"{tag}{i}", max_new_tokens=b)
                   for i, (p, b) in enumerate(work)]
            done = {}
            while len(done) < len(ids):
                r = manager.get_result(timeout=1)
                if r is not None and r.is_finished():
                    done[r.request_id] = list(r.generated_tokens)
            return [done[i] for i in ids]

        run_peer("warm")
        t_peer, peer_tokens = timed_result(lambda: run_peer("timed"))
    total = sum(b for _, b in work)
    w = suite.engine
    return {"work": f"engine: {len(work)} requests at once, prompts {w['prompt'][0]}-{w['prompt'][1]}, budgets "
                    f"{w['budget'][0]}-{w['budget'][1]}, {slots} slots", "unit": "tok/s",
            "ours": total / t_ours, "peer": total / t_peer, "first_call_s": first,
            "requests_match": sum(a == b for a, b in zip(ours_tokens, peer_tokens)), "requests": len(work)}
