"""Text-to-video timing: seconds per video and peak memory, our backend beside the bare diffusers call, in one run.

    python bench/t2v.py --pipeline ckpt/Wan2.1-T2V-1.3B-Diffusers [--setting num_frames=33 --setting steps=20]
                        [--option cpu_offload=true] [--prompts 2] [--reps 3] [--json r.json] [--markdown r.md]
    python bench/t2v.py --tiny [--families wan,ltx]      # the tiny random pipelines of every family, on the CPU

For a real local pipeline directory (when a GPU is lent; nothing is downloaded) and, on any machine, for the tiny
pipelines ``g4v_jax.t2v.tiny`` builds. Each row renders ``--prompts`` prompts at the family's default settings (or
``--setting`` overrides) twice per rep, the two sides alternating:
- ours: ``make_backend("diffusers", path=...).generate`` (the family's rules, prompt template, per-prompt seeds,
  the conversion to uint8 (N, F, H, W, 3));
- peer: the same pipeline object called directly with the same arguments (``DiffusersBackend.call_arguments``),
  ``output_type="np"``, as a user of diffusers would.
Both run the same torch code, so the ratio shows what the backend adds; the seconds per video and peak memory are
what a user plans a GPU around. Each row runs in a fresh process. Memory: ``torch.cuda.max_memory_allocated`` per
side on CUDA; on the CPU the row's process's peak resident set (one figure: both sides share the process).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from g4v_jax.cli import parse_key_values  # noqa: E402
from g4v_jax.t2v import T2VSettings, make_backend  # noqa: E402

PROMPTS = ("a red panda eating bamboo in a forest", "waves on a beach at night", "a green square spins",
           "a blue circle moves to the right")
# the tiny pipelines' sizes: each family's rules at a few frames, so that every row runs in seconds on a CPU
TINY_SETTINGS = {
    "zeroscope": dict(num_frames=8, height=64, width=64, steps=4),
    "animatediff": dict(num_frames=8, height=64, width=64, steps=4),
    "wan": dict(num_frames=9, height=64, width=64, steps=4),
    "ltx": dict(num_frames=17, height=64, width=64, steps=4),
    "cogvideox": dict(num_frames=9, height=32, width=32, steps=4),
}


def peak_rss_gib() -> float:
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def timed_peak(fn, torch, cuda: bool) -> tuple[float, float | None]:
    """Seconds for ``fn()`` and, on CUDA, the peak memory it allocated (GiB)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return seconds, (torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def bench_pipeline(path: Path, *, options: dict, settings: dict, prompts: int, reps: int) -> dict:
    import diffusers  # noqa: F401  (imported before the clock starts: load_s is the pipeline's own)
    import torch

    t0 = time.perf_counter()
    backend = make_backend("diffusers", path=path, **options)
    load_s = time.perf_counter() - t0
    cuda = str(backend.device).startswith("cuda")
    wanted = T2VSettings(**{**vars(backend.default_settings), **settings})
    batch = [PROMPTS[i % len(PROMPTS)] for i in range(prompts)]
    plan = backend.plan(batch, wanted)

    def ours():
        videos = backend.generate(batch, wanted)
        assert videos.shape[:4] == (prompts, plan.settings.num_frames, plan.settings.height, plan.settings.width)

    def peer():
        backend.pipeline(**backend.call_arguments(plan))

    ours()  # warm-up: first-call allocations, kernel selection
    times = {"ours": [], "peer": []}
    peaks = {"ours": [], "peer": []}
    for _ in range(reps):
        for side, fn in (("ours", ours), ("peer", peer)):
            seconds, peak = timed_peak(fn, torch, cuda)
            times[side].append(seconds)
            if peak is not None:
                peaks[side].append(peak)
    s = plan.settings
    ours_s, peer_s = statistics.median(times["ours"]), statistics.median(times["peer"])
    return {
        "pipeline": str(path), "family": backend.family.name, "class": type(backend.pipeline).__name__,
        "device": backend.device, "dtype": str(backend.dtype).replace("torch.", ""),
        "video": f"{s.num_frames}x{s.height}x{s.width}", "steps": s.steps, "prompts": prompts,
        "load_s": round(load_s, 3),
        "ours_s_per_video": ours_s / prompts, "peer_s_per_video": peer_s / prompts,
        "ours_over_peer": ours_s / peer_s,
        "peak_gib": ({"ours": max(peaks["ours"]), "peer": max(peaks["peer"])} if cuda
                     else {"process_rss": peak_rss_gib()}),
        "notes": sorted({n for notes in plan.notes for n in notes}),
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| family | pipeline class | device, dtype | video (FxHxW), steps | s/video ours | s/video diffusers | "
             "ours/diffusers | peak memory (GiB) | load (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = r["peak_gib"]
        peak_text = (f"{peak['ours']:.2f} / {peak['peer']:.2f}" if "ours" in peak
                     else f"{peak['process_rss']:.2f} (process RSS)")
        lines.append(f"| {r['family']} | {r['class']} | {r['device']}, {r['dtype']} | {r['video']}, {r['steps']} | "
                     f"{r['ours_s_per_video']:.3f} | {r['peer_s_per_video']:.3f} | {r['ours_over_peer']:.2f} | "
                     f"{peak_text} | {r['load_s']:.2f} |")
    return "\n".join(lines) + "\n"


def in_child(path: Path, options: dict, settings: dict, prompts: int, reps: int) -> dict:
    """One row in a fresh process: its peak memory is that pipeline's alone."""
    spec = json.dumps({"path": str(path), "options": options, "settings": settings, "prompts": prompts,
                       "reps": reps})
    out = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench/t2v.py: {path}: the run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        row = bench_pipeline(Path(spec["path"]), options=spec["options"], settings=spec["settings"],
                             prompts=spec["prompts"], reps=spec["reps"])
        print(json.dumps(row))
        return 0
    ap = argparse.ArgumentParser(prog="python bench/t2v.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--pipeline", action="append", default=[], help="a diffusers pipeline directory (repeatable)")
    what.add_argument("--tiny", action="store_true", help="the tiny random pipeline of each family, on the CPU")
    ap.add_argument("--families", default=",".join(TINY_SETTINGS), help="with --tiny: which families")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a backend option")
    ap.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE", help="a T2VSettings field")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per call (one video each)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    options = parse_key_values(args.option, "--option")
    settings = parse_key_values(args.setting, "--setting")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from g4v_jax.t2v.tiny import build_tiny_pipeline

            families = [f.strip() for f in args.families.split(",") if f.strip()]
            unknown = sorted(set(families) - set(TINY_SETTINGS))
            if unknown:
                ap.error(f"--families: unknown {unknown}; known: {', '.join(TINY_SETTINGS)}")
            jobs = [(build_tiny_pipeline(f, Path(tmp) / f), {"device": "cpu", **options},
                     {**TINY_SETTINGS[f], **settings}) for f in families]
        else:
            jobs = [(Path(p), options, settings) for p in args.pipeline]
        for path, opts, sets in jobs:
            row = in_child(path, opts, sets, args.prompts, args.reps)
            rows.append(row)
            print(f"{row['family']:12s} {row['video']:>12s} x{row['steps']} steps: "
                  f"{row['ours_s_per_video']:.3f} s/video (diffusers {row['peer_s_per_video']:.3f}, "
                  f"ratio {row['ours_over_peer']:.2f})", flush=True)
    table = markdown(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
