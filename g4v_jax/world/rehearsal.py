"""General rehearsal for stage 2 on a pretrained LLM: the LLM's own answers to general questions, mixed into the
world's stage-2 dialogues so that the adapters learn the world without rewriting what the LLM says elsewhere.

Stage 2 tunes LoRA adapters on narrow, terse dialogues (captions, ``Sure, here it is: <video>...</video>``,
refusals). Alone, they teach the adapters to answer everything that way (``docs/world.md``, "What stage 2 cost
SmolLM2"). Rehearsal rows put the LLM's behaviour outside the world into the same loss: each is a general question
(``REHEARSAL_QUESTIONS``, written for this; none overlaps ``world.kept``'s held-out prompts and text) answered by the
LLM *before* any tuning, in its own chat template, ``SAMPLES`` times at temperature 1. On those rows the untouched
LLM's loss is what it is on its own text; adapters that drift from it pay for the drift. This is self-distillation on
sampled text, the cheap form of a KL term to the frozen model: the answers are draws from the LLM itself, so the
loss's optimum is the LLM's own distribution. Greedy answers would not be: trained on, they sharpen it
(``docs/world.md``). Marked ``distill`` (``mixed_manifest``), the rows take the KL term itself
(``train.distill_weight``): they train toward the LLM's whole next-token distribution at every token, with the
sampled answers only as the text it is read on. Nothing is downloaded, and rehearsal teaches nothing new.

The rows are in the world's training template (``###Human: q ###AI: a``), so the served model answers general
questions in that template as the LLM answered them in its own; a share of them (``own_template``) is in the LLM's
own chat template, where the adapters act as well and where ``world.kept`` asks.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Sequence

from g4v_jax.data.io import resolve_video_path
from g4v_jax.data.manifest import Example, read_manifest, write_manifest
from g4v_jax.data.template import Turn

# Questions and small writing tasks across general knowledge, kept away from ``kept.GENERAL_PROMPTS``' facts and
# question frames (a test checks their words), from ``kept.HELD_OUT_TEXT``'s subjects, and from the world's scenes.
REHEARSAL_QUESTIONS = (
    "What is the boiling point of water at sea level?",
    "Who painted the Mona Lisa?",
    "What is the tallest mountain in the world?",
    "How many legs does a spider have?",
    "What is the chemical symbol for gold?",
    "Which animal is known as the king of the jungle?",
    "What is the main ingredient of guacamole?",
    "How many continents are there?",
    "What is the longest river in Africa?",
    "Who was the first person to walk on the Moon?",
    "What instrument has 88 keys?",
    "What do caterpillars turn into?",
    "What is the largest desert in the world?",
    "What is the currency of the United Kingdom?",
    "How many strings does a violin have?",
    "What organ pumps blood through the body?",
    "What is the fastest land animal?",
    "Which season comes after winter?",
    "What is 10 times 10?",
    "What is the smallest prime number?",
    "Which metal is liquid at room temperature?",
    "What does a dentist do?",
    "Who invented the telephone?",
    "What is the hardest natural substance?",
    "How many sides does a hexagon have?",
    "What is the tallest animal?",
    "What do you call a baby cat?",
    "Which bird is a symbol of peace?",
    "What is the largest mammal?",
    "What do you call a young dog?",
    "What do pandas mainly eat?",
    "What is the name of our galaxy?",
    "Explain what a computer keyboard is used for.",
    "Give me a tip for sleeping better.",
    "Why do people wear sunscreen?",
    "What is a good way to save money?",
    "Explain in one sentence what an umbrella is for.",
    "Why is exercise good for you?",
    "What should you do before crossing a street?",
    "Give me one reason to drink enough water.",
    "How do you make a cup of tea?",
    "What is a noun?",
    "What is the past tense of the verb 'run'?",
    "Write a short sentence about the moon.",
    "Write one sentence about a dog playing in a park.",
    "Describe a beach in one sentence.",
    "Write a short sentence about autumn leaves.",
    "Write a polite way to ask for help.",
    "Suggest a name for a pet goldfish.",
    "What is photosynthesis in simple words?",
    "What does a thermometer measure?",
    "Why do we have day and night?",
    "What is gravity?",
    "What is the difference between weather and climate?",
    "Name three fruits.",
    "Name a famous scientist.",
    "What is a volcano?",
    "What is a rainbow?",
    "What is the plural of 'mouse'?",
    "Translate 'thank you' into Spanish.",
    "What is a synonym for 'happy'?",
    "What is the square root of 81?",
    "Name a vegetable that is orange.",
    "Who discovered penicillin?",
)

MAX_NEW_TOKENS = 96
SAMPLES = 4  # answers drawn per question


def rehearsal_examples(lm, tokenizer, questions: Sequence[str] = REHEARSAL_QUESTIONS,
                       max_new_tokens: int = MAX_NEW_TOKENS, samples: int = SAMPLES, seed: int = 0,
                       temperature: float = 1.0) -> list[Example]:
    """Text-only dialogues of the questions, each answered ``samples`` times by the untuned LLM ``lm`` in its own
    chat template at ``temperature`` (1: one seeded draw per row; 0: greedy); a repeated answer is kept once.

    Answers cut at ``max_new_tokens`` are dropped: trained with the template's end of turn, a cut answer would
    teach the adapters to stop mid-sentence."""
    from g4v_jax.world.kept import chat_answers

    asked = [q for q in questions for _ in range(samples)]
    tokens = chat_answers(lm, tokenizer, asked, max_new_tokens, temperature=temperature, seed=seed)
    eos = tokenizer.eos_token_id
    out, seen = [], set()
    for i, (q, row) in enumerate(zip(asked, tokens)):
        answer = tokenizer.decode([t for t in row if t != eos], skip_special_tokens=True).strip()
        if row and row[-1] == eos and answer and (q, answer) not in seen:
            seen.add((q, answer))
            out.append(Example(id=f"rehearsal-{i:04d}", videos=(), captions=(),
                               turns=(Turn("human", q), Turn("ai", answer))))
    if not out:
        raise ValueError(f"no rehearsal answer ended within {max_new_tokens} tokens: the LLM's end-of-turn id "
                         f"{eos} is not what it generates")
    return out


def mixed_manifest(world_manifest: Path, rehearsal: Sequence[Example], out: Path, fraction: float,
                   seed: int, distill: bool = False, own_template: float = 0.0) -> Path:
    """``out``: the world's stage-2 rows plus the rehearsal rows repeated so that they make ``fraction`` of it, in
    one seeded shuffle (the data pipeline shuffles again per epoch; this keeps the file readable as a mix).
    ``distill``: the rehearsal rows are marked ``"distill"``, so that under ``train.distill_weight`` they train
    toward the untuned LLM's whole next-token distribution (a KL term) rather than on the sampled answer.
    ``own_template``: the share of the rehearsal rows written in the LLM's own chat template (``"template": "llm"``,
    a seeded choice), the rest in GPT4Video's: the adapters act on both, so each needs rows that hold it."""
    if not 0 < fraction < 1:
        raise ValueError(f"the rehearsal fraction must be in (0, 1), got {fraction}")
    if not 0 <= own_template <= 1:
        raise ValueError(f"the share of rehearsal rows in the LLM's own template must be in [0, 1], got {own_template}")
    # the world's relative video paths are kept pointing at its videos from where ``out`` is
    world = [dataclasses.replace(ex, videos=tuple(os.path.relpath(resolve_video_path(v, world_manifest.parent),
                                                                  out.parent) for v in ex.videos))
             for ex in read_manifest(world_manifest)]
    want = round(len(world) * fraction / (1 - fraction))
    n = len(rehearsal)
    own = set(random.Random(seed + 1).sample(range(want), round(want * own_template)))
    rows = [*world, *(dataclasses.replace(rehearsal[i % n], id=f"{rehearsal[i % n].id}-{i // n}", distill=distill,
                                          template="llm" if i in own else "gpt4video")
                      for i in range(want))]
    random.Random(seed).shuffle(rows)
    write_manifest(out, rows)
    return out


def stage2_manifest(llm_dir: Path, world_manifest: Path, out_dir: Path, fraction: float, seed: int,
                    questions: Sequence[str] = REHEARSAL_QUESTIONS, temperature: float = 1.0,
                    answers: Path | None = None, distill: bool = False, own_template: float = 0.0) -> Path:
    """``out_dir/stage2_mixed.jsonl``: the world's stage-2 rows with ``fraction`` rehearsal rows of the untuned LLM in
    ``llm_dir`` (marked for distillation with ``distill``, ``own_template`` of them in its own chat template,
    ``mixed_manifest``), whose answers are kept in ``answers``
    (default ``out_dir/rehearsal.jsonl``; made once, a rerun or another run with the same answers reads them)."""
    answers = answers if answers is not None else out_dir / "rehearsal.jsonl"
    if not answers.is_file():  # drawn once: a rerun of an interrupted run trains on the same rows
        import g4v_jax
        from g4v_jax.data.tokenizer import load_tokenizer
        from g4v_jax.models.gpt4video import language_model

        lm = language_model(g4v_jax.load(llm_dir, ["model.scan_layers=true"]))  # compiles one layer, not all
        write_manifest(answers, rehearsal_examples(lm, load_tokenizer(llm_dir), questions, seed=seed,
                                                   temperature=temperature))
    return mixed_manifest(world_manifest, read_manifest(answers), out_dir / "stage2_mixed.jsonl", fraction, seed,
                          distill, own_template)
