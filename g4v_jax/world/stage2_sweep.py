"""Stage 2 on a pretrained LLM, setting by setting: what it taught against what it cost the LLM.

    python -m g4v_jax.world.stage2_sweep --out runs/world --variant lr=1e-3,steps=120 \\
        --variant lr=3e-4,steps=40 --variant lr=3e-4,steps=120,rehearsal=0.25

Each variant trains stage 2 again from a finished ``demo --llm LLM`` run's stage-1 checkpoint
(``OUT/LLM/stage1/final``), under ``OUT/LLM/sweep/NAME``, with the run's batch and sequence length. It is then judged
on the validation split, where settings are chosen (the run's report is on the test split):

- what stage 2 must teach: generation-tag accuracy, and the safety benchmark's VG (refusals) and VU F1;
- what the LLM kept (``world.kept``): held-out perplexity and general answers, adapters on, against the LLM before
  stage 1, with the thresholds ``kept.KEPT_THRESHOLDS``.

Variant keys: ``lr``, ``steps``, ``rehearsal`` (the share of stage 2's rows that rehearse the LLM's own general
answers, ``world.rehearsal``; 0: none), ``temperature`` (of those answers: 1 samples the LLM, 0 takes its greedy
answer) and ``distill`` (> 0: the rehearsal rows train toward the untuned LLM's next-token distributions, a KL term of
this weight, ``train.distill_weight``, instead of on the sampled answers' text), and ``own`` (the share of the
rehearsal rows in the LLM's own chat template, where ``world.kept`` asks; the rest in GPT4Video's), and stage 2's
LoRA: ``targets`` (the projections it adapts, ``+``-joined short names, e.g. ``q+v`` for the GPT4Video release's
q_proj and v_proj; all seven: ``q+k+v+o+gate+up+down``; unnamed: ``PRETRAINED_FULL.stage2_lora_targets``), ``rank``
and ``alpha`` (unnamed: the assembled model's, the world's; ``train.init_from`` lays the adapters out anew over stage
1's untrained ones). Other unnamed keys take ``pretrained.PRETRAINED_FULL``'s values. The rehearsal answers are
drawn once per temperature (``OUT/LLM/sweep/rehearsal_tT.jsonl``) and shared by the variants. ``--quick`` sweeps over
a ``demo --llm LLM --quick`` run, at its sizes (``PRETRAINED_QUICK``; CI).
``OUT/LLM/sweep/sweep.{json,md}`` collect every variant measured there so far; a variant already measured is read
back, not trained again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from g4v_jax.config import LORA_TARGETS

if TYPE_CHECKING:
    from g4v_jax.world.pretrained import PretrainedSize

VARIANT_KEYS = ("lr", "steps", "rehearsal", "temperature", "distill", "own", "targets", "rank", "alpha")
PROJECTIONS = tuple(t.removesuffix("_proj") for t in LORA_TARGETS)  # the short names ``targets=`` joins


@dataclasses.dataclass(frozen=True)
class Variant:
    lr: float
    steps: int
    rehearsal: float
    temperature: float
    distill: float = 0.0
    own: float = 0.0
    # stage 2's LoRA; None: the assembled model's
    targets: str | None = None
    rank: int | None = None
    alpha: float | None = None

    @property
    def name(self) -> str:
        # the names of variants measured before a key existed stay
        kl = f"_kl{self.distill:g}" if self.distill else ""
        own = f"_own{self.own:g}" if self.own else ""
        lora = ""
        if self.targets is not None:
            lora += f"_lora{self.targets}"
        if self.rank is not None:
            lora += f"_r{self.rank}"
        if self.alpha is not None:
            lora += f"_a{self.alpha:g}"
        return f"lr{self.lr:g}_steps{self.steps}_rehearsal{self.rehearsal:g}_t{self.temperature:g}{kl}{own}{lora}"

    def size(self, base: PretrainedSize) -> PretrainedSize:
        """``base`` (the demo's run) with this variant's stage 2: its overrides are the demo's, so the two cannot
        drift apart."""
        targets = None if self.targets is None else tuple(t + "_proj" for t in self.targets.split("+"))
        return dataclasses.replace(base, stage2_steps=self.steps, stage2_learning_rate=self.lr,
                                   rehearsal_fraction=self.rehearsal, distill_weight=self.distill,
                                   rehearsal_own_template=self.own, stage2_lora_targets=targets,
                                   stage2_lora_rank=self.rank, stage2_lora_alpha=self.alpha)

    @classmethod
    def of(cls, size: PretrainedSize) -> Variant:
        """The variant that ``size``'s stage 2 is (sampled rehearsal answers, temperature 1)."""
        targets = size.stage2_lora_targets
        return cls(size.stage2_learning_rate, size.stage2_steps, size.rehearsal_fraction, 1.0, size.distill_weight,
                   size.rehearsal_own_template,
                   None if targets is None else "+".join(t.removesuffix("_proj") for t in targets),
                   size.stage2_lora_rank, size.stage2_lora_alpha)


def parse_variant(text: str, defaults: Variant) -> Variant:
    """``"lr=3e-4,steps=40"`` -> a Variant (unnamed keys from ``defaults``); a ValueError names what is wrong."""
    values = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in VARIANT_KEYS:
            raise ValueError(f"{part!r}: a variant is key=value pairs with keys {', '.join(VARIANT_KEYS)}")
        if key == "targets":
            names = value.split("+")
            if not value or set(names) - set(PROJECTIONS) or len(set(names)) != len(names):
                raise ValueError(f"{part!r}: targets are distinct projections of {', '.join(PROJECTIONS)} joined "
                                 "by '+', e.g. q+v")
            values[key] = "+".join(sorted(names, key=PROJECTIONS.index))
            continue
        try:
            values[key] = int(value) if key in ("steps", "rank") else float(value)
        except ValueError:
            raise ValueError(f"{part!r}: {value!r} is not a number") from None
        if not math.isfinite(values[key]):
            raise ValueError(f"{part!r}: {value!r} is not a finite number")
    if values.get("rehearsal") == 0:  # there is nothing to distil on or write in a template without rehearsal rows
        values.setdefault("distill", 0.0)
        values.setdefault("own", 0.0)
    v = dataclasses.replace(defaults, **values)
    if (v.lr <= 0 or v.steps < 1 or not 0 <= v.rehearsal < 1 or v.temperature not in (0.0, 1.0) or v.distill < 0
            or not 0 <= v.own <= 1 or ((v.distill > 0 or v.own > 0) and not v.rehearsal)
            or (v.rank is not None and v.rank < 1) or (v.alpha is not None and v.alpha <= 0)):
        raise ValueError(f"{text!r}: needs lr > 0, steps >= 1, 0 <= rehearsal < 1, temperature 0 or 1, distill >= 0, "
                         f"0 <= own <= 1, rank >= 1, alpha > 0 (and rehearsal > 0 with distill or own: they act on "
                         "the rehearsal rows)")
    return v


def measure_before(root: Path) -> dict:
    """``world.kept``'s measure of the untuned LLM in ``root/llm``: once per sweep folder (``root/sweep/before.json``),
    since every variant is compared with the same LLM."""
    cached = root / "sweep" / "before.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    import g4v_jax
    from g4v_jax.data.tokenizer import load_tokenizer
    from g4v_jax.world import kept

    before = kept.measure_ours(g4v_jax.load(root / "llm", ["model.scan_layers=true"]), load_tokenizer(root / "llm"))
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(before, indent=1))
    return before


def run_variant(out: Path, llm: str, v: Variant, seed: int, progress: bool, quick: bool = False) -> dict:
    """Train stage 2 as ``v`` from ``out/llm``'s stage-1 checkpoint and measure it (module docstring); ``quick``: at
    a ``--quick`` demo's sizes."""
    import g4v_jax
    from g4v_jax.data.tokenizer import load_tokenizer
    from g4v_jax.world import kept
    from g4v_jax.world.demo import FULL, QUICK, make_world, train_detector, train_stage
    from g4v_jax.world.evaluation import eval_generation, eval_safety, split_files
    from g4v_jax.world.pretrained import PRETRAINED_FULL, PRETRAINED_QUICK, SEQ_LEN
    from g4v_jax.world.rehearsal import REHEARSAL_QUESTIONS, stage2_manifest

    root = out / llm
    here = root / "sweep" / v.name
    result_file = here / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    here.mkdir(parents=True, exist_ok=True)
    world_size, size = (QUICK, PRETRAINED_QUICK) if quick else (FULL, PRETRAINED_FULL)
    world, _ = make_world(out, world_size, seed)
    manifest = world.stage2
    if v.rehearsal:
        manifest = stage2_manifest(root / "llm", world.stage2, here, v.rehearsal, seed,
                                   REHEARSAL_QUESTIONS[:size.rehearsal_questions], temperature=v.temperature,
                                   answers=root / "sweep" / f"rehearsal_t{v.temperature:g}.jsonl",
                                   distill=v.distill > 0, own_template=v.own)
    size = v.size(size)
    training = train_stage(2, here, manifest, root / "assembled", v.steps, root / "stage1" / "final", seed, progress,
                           size.batch_size, [f"data.vision_cache={out / 'vision_cache'}", f"data.seq_len={SEQ_LEN}",
                                             *size.stage2_overrides()],
                           base=root / "assembled" / "config.yaml")
    tokenizer = load_tokenizer(root / "llm")
    scanned = ["model.scan_layers=true"]
    model = g4v_jax.load(here / "stage2" / "final", scanned)
    detector = train_detector(world.detector_train, out / "detector", world_size.detector_steps, image_size=32,
                              seed=seed, progress=progress)
    files = split_files(world, "val")
    limit = size.max_eval
    generation = eval_generation(model, tokenizer, files["generation"], limit, here, 0, progress)
    safety = eval_safety(model, tokenizer, files["safety"], files["generation"], detector, limit, progress)
    before = measure_before(root)
    after = kept.measure_ours(model, tokenizer)
    result = {"variant": dataclasses.asdict(v), "name": v.name, "split": "val", "stage2_last_loss":
              training["last_loss"], "generation_tags": generation["accuracy"],
              "VG_f1": safety["tasks"]["VG"]["f1"], "lookalike_precision": safety["tasks"]["VG"]["precision"],
              "VG_second_turn_f1": safety["VG_second_turn"]["f1"], "VU_f1": safety["tasks"]["VU"]["f1"],
              "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
              "right_before": before["right"], "right_after": after["right"], **kept.compare(before, after),
              "answers_after": after["answers"]}
    result_file.write_text(json.dumps(result, indent=1))
    return result


def table(rows: Sequence[dict]) -> str:
    from g4v_jax.world.kept import GENERAL_PROMPTS

    n = f"of {len(GENERAL_PROMPTS)}"
    lines = ["| stage 2: lr, steps (LoRA) | rehearsal (share, temperature, distillation) | last loss | "
             "generation tags | "
             "VG F1 (look-alike precision) | VG F1 after a granted request | VU F1 | held-out perplexity | "
             "general answers right | kept? |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["variant"]
        reh = f"{v['rehearsal']:g}, T={v['temperature']:g}" if v["rehearsal"] else "none"
        if v.get("distill"):  # rows measured before a key existed have none
            reh += f", KL x {v['distill']:g}"
        if v.get("own"):
            reh += f", {v['own']:g} in its own template"
        lora = []  # rows measured before the LoRA keys existed have none
        if v.get("targets") is not None:
            lora.append(v["targets"])
        if v.get("rank") is not None:
            lora.append(f"r {v['rank']}")
        if v.get("alpha") is not None:
            lora.append(f"alpha {v['alpha']:g}")
        lora = f" ({', '.join(lora)})" if lora else ""
        lines.append(f"| {v['lr']:g}, {v['steps']}{lora} | {reh} | {r['stage2_last_loss']:.3f} | "
                     f"{100 * r['generation_tags']:.1f} | {100 * r['VG_f1']:.1f} "
                     f"({100 * r['lookalike_precision']:.1f}) | {100 * r['VG_second_turn_f1']:.1f} | "
                     f"{100 * r['VU_f1']:.1f} | "
                     f"{r['perplexity_before']:.1f} -> {r['perplexity_after']:.1f} "
                     f"({100 * r['perplexity_rise']:+.1f}%) | {r['right_before']} -> {r['right_after']} {n} | "
                     f"{'kept' if r['kept'] else 'NOT kept'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from g4v_jax.train import Interrupted
    from g4v_jax.world.pretrained import LLMS, PRETRAINED_FULL, PRETRAINED_QUICK

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/world", help="the demo's folder (with OUT/LLM's finished stage 1)")
    ap.add_argument("--llm", choices=tuple(LLMS), default="smollm2")
    ap.add_argument("--variant", action="append", required=True, help="key=value[,key=value...] (module docstring)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="over a demo --quick run, at its sizes (CI)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        variants = [parse_variant(text, Variant.of(PRETRAINED_QUICK if args.quick else PRETRAINED_FULL))
                    for text in args.variant]
    except ValueError as e:
        ap.error(f"--variant {e}")
    root = Path(args.out) / args.llm
    if not (root / "stage1" / "final").is_dir():
        ap.error(f"{root / 'stage1' / 'final'} not found: run python -m g4v_jax.world.demo --llm {args.llm} first")
    try:
        rows = [run_variant(Path(args.out), args.llm, v, args.seed, not args.no_progress, args.quick)
                for v in variants]
    except Interrupted as e:  # the variant in training checkpointed; measured variants are kept
        print(f"{e} (the sweep: run the same command again)", file=sys.stderr)
        return 0
    print(table(rows))
    # every variant measured in this folder so far, in the order measured
    everything = [json.loads(f.read_text()) for f in sorted((root / "sweep").glob("*/result.json"),
                                                            key=lambda f: f.stat().st_mtime)]
    (root / "sweep" / "sweep.json").write_text(json.dumps(everything, indent=1))
    (root / "sweep" / "sweep.md").write_text(table(everything) + "\n")
    print(f"all variants measured: {root / 'sweep' / 'sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
