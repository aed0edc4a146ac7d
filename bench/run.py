"""Our hot paths beside the PyTorch stack, in one run, on the same weights: ``python bench/run.py --suite cpu``.

The suites and what rows share are ``bench/common.py``; each row group is a module of ``bench/rows/`` (a new row is a
new module there); the table is ``bench/table.py``. This file runs them.

    python bench/run.py --suite cpu|gpu|all [--tiny] [--rows prefill,decode,...] [--reps 3] [--json out.json]
                        [--markdown out.md]

Suites (one ``Suite`` each; every row is the same code on every suite, only sizes, dtype and device differ):
- ``cpu``: fp32 on the CPU, a SmolLM2-135M-shaped LLaMA (vocab 49152, hidden 576, 30 layers, 9 heads, 3 KV heads)
  and CLIP ViT-B/16;
- ``gpu``: bf16 weights (fp32 LoRA adapters) on the first CUDA device, LLaMA-7B and CLIP ViT-L/14 (paper sizes);
- ``--tiny``: the chosen suite's rows on toy sizes, on the CPU, in a few minutes (what CI runs to keep the GPU
  script working while no GPU is lent).

Random weights are drawn once by HF (``LlamaForCausalLM`` / ``CLIPVisionModel``), saved, and converted by our
converters, so both sides hold identical numbers. Rows:
- peak probes measured here: the matmul rate (jax and torch) and, on the CPU, memory bandwidth (a STREAM-like copy);
- prefill (logits at the last position only on both sides: HF's ``logits_to_keep=1``, our ``logits_at``);
- greedy decode at batch 1 and 8 (ours ``inference.generate``, HF ``generate``; the tokens are compared), with the
  first call's compile time and, at batch 1, the bandwidth limit (weight bytes / measured bandwidth);
- the engine: every request at t = 0, mixed prompts and budgets, our ``Engine`` beside transformers' own
  continuous batching (paged attention), the same number of slots;
- the LoRA r16 q/v train step (ours: ``train.build_trainer`` stage 2, with and without ``remat=dots``; the peer: HF +
  PEFT + torch AdamW), each side in fresh processes for its peak memory;
- CLIP ViT frames/s.
Timed figures are medians of ``--reps`` runs, the two sides alternating rep by rep (the fairest pairing on a shared
machine). The "limit" column is the machine's own: the best measured matmul rate over the row's multiply-adds, or the
measured bandwidth over the bytes a decode step must read.
"""


from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# two frameworks share one GPU here: JAX must not take 75% of it up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from common import SUITES, Context, Suite, log, probes, tiny  # noqa: E402
from rows import groups  # noqa: E402
from table import markdown  # noqa: E402

GROUPS = groups()
ROW_GROUPS = tuple(GROUPS)
CHILDREN = {name: fn for module in GROUPS.values() for name, fn in getattr(module, "CHILDREN", {}).items()}


def run_suite(suite: Suite, suite_args: list[str], reps: int, groups: tuple[str, ...] = ROW_GROUPS) -> dict:
    """The suite's rows of ``groups`` (a lent GPU's minutes are few: run the groups in several calls if need be)."""
    import jax
    import torch

    peak = probes(suite, reps)
    print(f"[{suite.name}] probes {peak}", file=sys.stderr, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(suite, suite_args, reps, peak, Path(tmp))
        for name, module in GROUPS.items():
            if name in groups:
                new = module.rows(ctx)
                rows += new
                if new:
                    log(suite, rows)
    return {"suite": suite.name, "machine": platform.node(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg(), "jax": jax.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "dtype": suite.dtype,
            "peak": peak, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("cpu", "gpu", "all"), default="cpu")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: checks the suite's code in minutes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROW_GROUPS),
                    help=f"comma-separated row groups to run, of {', '.join(ROW_GROUPS)} (default: all)")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--markdown", default="", help="write the tables here")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    args = ap.parse_args()
    groups = tuple(g.strip() for g in args.rows.split(",") if g.strip())
    unknown = sorted(set(groups) - set(ROW_GROUPS))
    if unknown:
        ap.error(f"--rows: unknown group(s) {', '.join(unknown)}; choose from {', '.join(ROW_GROUPS)}")
    names = ["cpu", "gpu"] if args.suite == "all" else [args.suite]
    if args.child:
        suite = tiny(SUITES[names[0]]) if args.tiny else SUITES[names[0]]
        print(json.dumps(CHILDREN[args.child](suite, args.src)))
        return
    results = []
    for name in names:
        suite = tiny(SUITES[name]) if args.tiny else SUITES[name]
        if suite.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                print(f"bench/run.py: suite {name} needs a CUDA GPU and this machine has none; skipped "
                      "(--tiny runs its rows on toy sizes on the CPU)", file=sys.stderr)
                continue
        results.append(run_suite(suite, ["--suite", name, *(["--tiny"] if args.tiny else [])], args.reps, groups))
        print(markdown(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(markdown(r) for r in results))
    if not results:
        sys.exit(1)


if __name__ == "__main__":
    main()
