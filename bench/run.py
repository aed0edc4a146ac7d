"""Our hot paths beside the PyTorch stack, in one process, on the same weights: `python bench/run.py --suite cpu`.

    python bench/run.py --suite cpu [--reps 3] [--json out.json]

CPU suite (fp32, a SmolLM2-135M-shaped LLaMA: vocab 49152, hidden 576, 30 layers, 9 heads, 3 KV heads; random
weights made once by HF ``LlamaForCausalLM`` and converted, so both sides hold identical numbers):
- peak probes measured here: fp32 matmul FLOP/s (jax and torch, 1024³) and memory bandwidth (a STREAM-like copy);
- prefill 1×512 (logits at the last position only on both sides: HF's ``logits_to_keep=1``, our ``logits_at``),
  into a KV cache;
- greedy decode at batch 1 and 8 (64-token prompt, 64 new tokens): ours ``inference.generate``, HF ``generate``;
  the tokens must match; the batch-1 row also gives the bandwidth limit (weight bytes / measured bandwidth);
- the first ``generate`` call's compile time.
Each figure is the median of ``--reps`` runs, the two sides alternating rep by rep (the fairest pairing on a shared
machine). The LoRA step, ViT, engine and GPU rows of issue 24 are not in this version yet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOLLM = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
              rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired(ours, peer, reps: int) -> tuple[float, float]:
    """Median seconds of each, alternating ours/peer rep by rep (one untimed warm call each first)."""
    ours(), peer()
    a, b = [], []
    for _ in range(reps):
        a.append(timed(ours))
        b.append(timed(peer))
    return statistics.median(a), statistics.median(b)


def probes(reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    n = 1024
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    xt = torch.randn(n, n)
    t_jax, t_torch = paired(lambda: mm(x).block_until_ready(), lambda: torch.mm(xt, xt), max(reps, 5))
    buf = np.ones(64 * 2**20 // 8)  # 64 MiB
    out = np.empty_like(buf)
    t_copy = statistics.median(timed(lambda: np.copyto(out, buf)) for _ in range(max(reps, 5)))
    return {"matmul_gflops_jax": 2 * n**3 / t_jax / 1e9, "matmul_gflops_torch": 2 * n**3 / t_torch / 1e9,
            "copy_bandwidth_gbs": 2 * buf.nbytes / t_copy / 1e9}


def models(tmp: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from convert.hf_llama import load_hf_llama

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SMOLLM, attn_implementation="sdpa")).eval()
    hf.save_pretrained(tmp)
    _, ours = load_hf_llama(tmp)
    return hf, ours


def prefill_row(hf, ours, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from g4v_jax.models.llama import init_cache

    length = 512
    ids = np.random.default_rng(0).integers(3, SMOLLM["vocab_size"], (1, length)).astype(np.int32)
    graphdef, state = nnx.split(ours)

    @jax.jit
    def prefill(state, ids):
        model = nnx.merge(graphdef, state)
        cache = init_cache(model.cfg, 1, length, jnp.float32)
        return model(ids, cache=cache, logits_at=jnp.full((1,), length - 1, jnp.int32))

    tids = torch.from_numpy(ids).long()

    def peer():
        with torch.no_grad():
            return hf(tids, use_cache=True, logits_to_keep=1).logits

    ours_logits = np.asarray(prefill(state, ids)[0])[0, -1]
    peer_logits = peer()[0, -1].numpy()
    t_ours, t_peer = paired(lambda: jax.block_until_ready(prefill(state, ids)), peer, reps)
    return {"work": "prefill 1×512", "unit": "tok/s", "ours": length / t_ours, "peer": length / t_peer,
            "max_abs_logit_diff": float(np.abs(ours_logits - peer_logits).max())}


def decode_rows(hf, ours, reps: int, bandwidth: float) -> list[dict]:
    import jax
    import torch

    from g4v_jax.inference.generate import SamplingConfig, generate

    rows = []
    prompt, new = 64, 64
    for batch in (1, 8):
        ids = np.random.default_rng(batch).integers(3, SMOLLM["vocab_size"], (batch, prompt)).astype(np.int32)
        inputs = {"input_ids": ids, "attention_mask": np.ones((batch, prompt), bool)}
        cfg = SamplingConfig(max_new_tokens=new)
        compile_s = 0.0
        if batch == 1:
            jax.clear_caches()
            compile_s = timed(lambda: generate(ours, inputs, cfg, eos_id=-1))
        tids = torch.from_numpy(ids).long()

        def peer():
            with torch.no_grad():
                return hf.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=new,
                                   min_new_tokens=new, do_sample=False, pad_token_id=0)

        ours_tokens = generate(ours, inputs, cfg, eos_id=-1).tokens
        peer_tokens = peer()[:, prompt:].numpy()
        t_ours, t_peer = paired(lambda: generate(ours, inputs, cfg, eos_id=-1), peer, reps)
        row = {"work": f"greedy decode, batch {batch}, {prompt}+{new}", "unit": "tok/s",
               "ours": batch * new / t_ours, "peer": batch * new / t_peer,
               "tokens_match": bool((ours_tokens == peer_tokens).all())}
        if batch == 1:
            weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
            row["limit"] = bandwidth * 1e9 / weight_bytes  # each token reads every weight once
            row["first_call_s"] = compile_s
        rows.append(row)
    return rows


def cpu_suite(reps: int) -> dict:
    import jax
    import torch

    peak = probes(reps)
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = models(Path(tmp))
        rows = [prefill_row(hf, ours, reps)]
        rows += decode_rows(hf, ours, reps, peak["copy_bandwidth_gbs"])
    return {"suite": "cpu", "machine": platform.node(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "load": os.getloadavg(), "jax": jax.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "peak": peak, "rows": rows}


def markdown(result: dict) -> str:
    p = result["peak"]
    lines = [f"Machine {result['machine']} ({result['cpus']} CPUs), {result['date']}, jax {result['jax']}, torch "
             f"{result['torch']}, Python {result['python']}, load average {result['load'][0]:.2f}. Probes: fp32 "
             f"matmul {p['matmul_gflops_jax']:.1f} GFLOP/s (jax) / {p['matmul_gflops_torch']:.1f} (torch); copy "
             f"bandwidth {p['copy_bandwidth_gbs']:.1f} GB/s.", "",
             "| work | ours | HF peer | ours/HF | limit | notes |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        notes = []
        if "tokens_match" in r:
            notes.append("tokens match" if r["tokens_match"] else "TOKENS DIFFER")
        if "max_abs_logit_diff" in r:
            notes.append(f"max abs logit difference {r['max_abs_logit_diff']:.1e}")
        if "first_call_s" in r:
            notes.append(f"first call (compile) {r['first_call_s']:.1f} s")
        limit = f"{r['limit']:.0f} {r['unit']}" if "limit" in r else ""
        lines.append(f"| {r['work']} | {r['ours']:.1f} {r['unit']} | {r['peer']:.1f} {r['unit']} | "
                     f"{r['ours'] / r['peer']:.2f} | {limit} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("cpu", "gpu", "all"), default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.suite != "cpu":
        sys.exit("bench/run.py: the GPU suite is not written yet (issue 24); run --suite cpu")
    result = cpu_suite(args.reps)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
