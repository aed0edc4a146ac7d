"""The suite's results as the markdown table of ``docs/benchmarks.md``: ours, the peer, the ratio, the machine's limit
and the row's notes."""

from __future__ import annotations


def _notes(r: dict) -> list[str]:
    notes = []
    if "tokens_match" in r:
        notes.append(f"tokens equal for {100 * r['tokens_match']:.0f}% of the sequence")
    if "max_abs_logit_diff" in r:
        notes.append(f"max abs logit difference {r['max_abs_logit_diff']:.1e}")
    if "max_abs_diff" in r:
        notes.append(f"max abs feature difference {r['max_abs_diff']:.1e}")
    if "requests_match" in r:
        notes.append(f"tokens equal on {r['requests_match']}/{r['requests']} requests")
    if "peak_gib" in r and r["peak_gib"][1] is None:
        notes.append(f"peak memory {r['peak_gib'][0]:.2f} GiB")
    elif "peak_gib" in r:
        notes.append(f"peak memory {r['peak_gib'][0]:.2f} / {r['peak_gib'][1]:.2f} GiB (ours / peer)")
    if "tokens_per_s" in r:
        notes.append(f"{r['tokens_per_s']:.0f} tok/s")
    if "ttft_s" in r:
        notes.append(f"first token after {r['ttft_s']:.3f} s")
    if "first_loss" in r:
        notes.append(f"first loss {r['first_loss'][0]:.3f} / {r['first_loss'][1]:.3f}")
    if "first_call_s" in r:
        notes.append(f"first call (compiles) {r['first_call_s']:.1f} s")
    if "scan" in r:
        notes.append(f"with `scan_layers`: first call {r['scan'][0]:.1f} s, {r['scan'][1]:.1f} {r['unit']}")
    return notes


def markdown(result: dict) -> str:
    p = result["peak"]
    where = p.get("card", f"{result['cpus']} CPUs")
    lines = [f"Suite `{result['suite']}`, {result['dtype']}: {result['machine']} ({where}), {result['date']}, jax "
             f"{result['jax']}, torch {result['torch']}, Python {result['python']}, load average "
             f"{result['load'][0]:.2f}. Probes: {result['dtype']} matmul {p['matmul_n']}³ "
             f"{1e3 * p['matmul_tflops_jax']:.0f} GFLOP/s (jax) / {1e3 * p['matmul_tflops_torch']:.0f} (torch); copy "
             f"bandwidth {p['bandwidth_gbs']:.1f} GB/s.", "",
             "| work | ours | HF peer | ours/HF | limit | notes |", "|---|---|---|---|---|---|"]
    peak_flops = 1e12 * max(p["matmul_tflops_jax"], p["matmul_tflops_torch"])
    for r in result["rows"]:
        if "flops" in r:  # the best measured matmul rate over the work's multiply-adds
            limit = f"{peak_flops / r['flops']:.0f} {r['unit']} (FLOP/s); ours at {r['ours'] * r['flops'] / peak_flops:.0%}"
        elif "limit" in r:
            limit = f"{r['limit']:.0f} {r['unit']} (bandwidth); ours at {r['ours'] / r['limit']:.0%}"
        else:
            limit = ""
        peer, ratio = ("—", "—") if r["peer"] is None else (f"{r['peer']:.1f} {r['unit']}", f"{r['ours'] / r['peer']:.2f}")
        lines.append(f"| {r['work']} | {r['ours']:.1f} {r['unit']} | {peer} | {ratio} | {limit} | "
                     f"{'; '.join(_notes(r))} |")
    return "\n".join(lines) + "\n"
