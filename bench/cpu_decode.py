"""Greedy decoding tokens/s of a small model on this machine: the KV-cache engine vs recomputing the prefix.

    python bench/cpu_decode.py [--config tiny] [--batch 8] [--prompt 64] [--new 64]

With the cache: ``g4v_jax.inference.generate.generate`` (one jitted prefill + while_loop). Without: every new token runs the
whole sequence so far through the model (one jitted forward over a fixed-size buffer, so it compiles once), the
cost a cache avoids. Both start from the same prompts and must produce the same tokens. CPU figures only say how
the two paths compare here; GPU throughput is bench/'s business in the performance issue.
"""

import argparse
import time

import jax
import numpy as np
from flax import nnx

from g4v_jax.config import load_config
from g4v_jax.inference.generate import SamplingConfig, generate
from g4v_jax.models.gpt4video import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    cfg = load_config(args.config, ["model.kind=llm"]).model
    model = build_model(cfg)
    b, p, n = args.batch, args.prompt, args.new
    ids = np.random.default_rng(0).integers(3, cfg.llm.vocab_size, (b, p)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones((b, p), bool)}
    sampling = SamplingConfig(max_new_tokens=n)

    generate(model, batch, sampling, eos_id=-1)  # compile
    t0 = time.perf_counter()
    cached = generate(model, batch, sampling, eos_id=-1).tokens
    t_cache = time.perf_counter() - t0

    graphdef, state = nnx.split(model)

    @jax.jit
    def next_token(state, buf, length):
        mask = np.arange(p + n)[None, :] < length
        logits, _ = nnx.merge(graphdef, state)(buf, attention_mask=mask)
        return jax.numpy.argmax(jax.numpy.take_along_axis(logits, (length - 1)[None, None, None], 1)[:, 0], -1)

    def recompute():
        buf = np.zeros((b, p + n), np.int32)
        buf[:, :p] = ids
        for i in range(n):
            buf[:, p + i] = np.asarray(next_token(state, buf, np.int32(p + i)))
        return buf[:, p:]

    recompute()  # compile
    t0 = time.perf_counter()
    uncached = recompute()
    t_full = time.perf_counter() - t0
    assert (uncached == cached).all(), "the two paths disagree"
    print(f"{jax.devices()[0].platform}, config {args.config}, batch {b}, prompt {p}, {n} new tokens (greedy)")
    print(f"  KV cache (generate):   {b * n / t_cache:10.0f} tok/s  ({t_cache * 1e3:.1f} ms)")
    print(f"  recompute the prefix:  {b * n / t_full:10.0f} tok/s  ({t_full * 1e3:.1f} ms)")
    print(f"  same tokens: yes; speed-up {t_full / t_cache:.1f}x")


if __name__ == "__main__":
    main()
