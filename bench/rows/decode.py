"""Greedy decode at the suite's batch sizes: ours ``inference.generate`` beside HF ``generate`` (the tokens compared),
the first call's compile time, the scanned model beside, and at batch 1 the bandwidth limit."""

from __future__ import annotations

import statistics

import numpy as np

from common import OURS_TRAIN, Context, Suite, our_dtypes, sync, timed, token_ids, paired

ORDER = 20  # where the group's rows stand in the table


def rows(ctx: Context) -> list[dict]:
    from g4v_jax.convert.hf_llama import load_hf_llama

    hf, ours = ctx.models()
    _, scanned = load_hf_llama(ctx.tmp / "llm", [*OURS_TRAIN, *our_dtypes(ctx.suite)])
    return decode_rows(ctx.suite, hf, ours, scanned, ctx.reps, ctx.peak["bandwidth_gbs"])


def matching_prefix(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the fraction of tokens before the first difference (bf16 kernels may part ways)."""
    fracs = []
    for x, y in zip(a, b):
        differ = np.nonzero(x != y)[0]
        fracs.append((differ[0] if len(differ) else len(x)) / len(x))
    return float(np.mean(fracs))


def decode_rows(suite: Suite, hf, ours, scanned, reps: int, bandwidth: float) -> list[dict]:
    """``scanned``: ours with ``scan_layers`` on, whose first call and rate go in the notes."""
    import jax
    import torch

    from g4v_jax.inference.generate import SamplingConfig, generate

    rows = []
    prompt, new, batches = suite.decode
    for batch in batches:
        ids = token_ids(suite, (batch, prompt), batch)
        inputs = {"input_ids": ids, "attention_mask": np.ones((batch, prompt), bool)}
        cfg = SamplingConfig(max_new_tokens=new)
        jax.clear_caches()
        first = timed(lambda: generate(ours, inputs, cfg, eos_id=-1))
        tids = torch.from_numpy(ids).long().to(suite.device)

        def peer():
            with torch.no_grad():
                out = hf.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, pad_token_id=0)
            sync(suite)
            return out

        ours_tokens = np.asarray(generate(ours, inputs, cfg, eos_id=-1).tokens)
        peer_tokens = peer()[:, prompt:].cpu().numpy()
        t_ours, t_peer = paired(lambda: generate(ours, inputs, cfg, eos_id=-1), peer, reps)
        jax.clear_caches()
        scan_first = timed(lambda: generate(scanned, inputs, cfg, eos_id=-1))
        t_scan = statistics.median(timed(lambda: generate(scanned, inputs, cfg, eos_id=-1)) for _ in range(reps))
        row = {"work": f"greedy decode, batch {batch}, {prompt}+{new}", "unit": "tok/s",
               "ours": batch * new / t_ours, "peer": batch * new / t_peer, "first_call_s": first,
               "tokens_match": matching_prefix(ours_tokens, peer_tokens),
               "scan": (scan_first, batch * new / t_scan)}
        if batch == 1:
            weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
            row["limit"] = bandwidth * 1e9 / weight_bytes  # each token reads every weight once
        rows.append(row)
    return rows
