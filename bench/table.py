"""The suite's results as the markdown table of ``docs/benchmarks.md``: ours, the peer, the ratio, the machine's limit
and the row's notes."""

from __future__ import annotations


# a row's optional fields and how its notes say them, in the order they are said
NOTES = [
    ("tokens_match", lambda r: f"tokens equal for {100 * r['tokens_match']:.0f}% of the sequence"),
    ("max_abs_logit_diff", lambda r: f"max abs logit difference {r['max_abs_logit_diff']:.1e}"),
    ("max_abs_diff", lambda r: f"max abs feature difference {r['max_abs_diff']:.1e}"),
    ("requests_match", lambda r: f"tokens equal on {r['requests_match']}/{r['requests']} requests"),
    ("peak_gib", lambda r: f"peak memory {r['peak_gib'][0]:.2f} GiB" if r["peak_gib"][1] is None
     else f"peak memory {r['peak_gib'][0]:.2f} / {r['peak_gib'][1]:.2f} GiB (ours / peer)"),
    ("tokens_per_s", lambda r: f"{r['tokens_per_s']:.0f} tok/s"),
    ("ttft_s", lambda r: f"first token after {r['ttft_s']:.3f} s"),
    ("first_loss", lambda r: f"first loss {r['first_loss'][0]:.3f} / {r['first_loss'][1]:.3f}"),
    ("first_call_s", lambda r: f"first call (compiles) {r['first_call_s']:.1f} s"),
    ("scan", lambda r: f"with `scan_layers`: first call {r['scan'][0]:.1f} s, {r['scan'][1]:.1f} {r['unit']}"),
]


def _notes(r: dict) -> list[str]:
    return [say(r) for key, say in NOTES if key in r]


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
