"""Stage 2's general rehearsal: its questions stay clear of what `world.kept` measures, cut answers are dropped, and
the mixed manifest holds the asked share of rehearsal rows with the world's videos still found."""

import dataclasses
import re

import pytest

from g4v_jax.data.io import resolve_video_path
from g4v_jax.data.manifest import read_manifest
from g4v_jax.world import kept, rehearsal

_FRAME = set("what is the a an of to in on for do does you how many are there which who was by me one give write short "
             "sentence about name known largest make".split())


def _words(text):
    return set(re.findall(r"[a-z]+", text.lower())) - _FRAME


def test_rehearsal_questions_do_not_ask_what_kept_measures():
    keywords = [k for _, k in kept.GENERAL_PROMPTS for k in k.split("|")]
    assert len(set(rehearsal.REHEARSAL_QUESTIONS)) == len(rehearsal.REHEARSAL_QUESTIONS)
    for q in rehearsal.REHEARSAL_QUESTIONS:
        assert not [k for k in keywords if re.search(rf"\b{k}\b", q.lower())], q
        for g, _ in kept.GENERAL_PROMPTS:
            a, b = _words(q), _words(g)
            assert len(a & b) <= len(a | b) // 3, (q, g)


class _Tokenizer:
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


def test_answers_cut_at_the_budget_are_dropped(monkeypatch):
    rows = [[5, 6, 2], [5, 6, 2], [7, 8, 9], [2], [4, 2], [3, 2]]  # per question: ended twice alike; cut, empty
    asked = []

    def answers(lm, tok, questions, n, temperature, seed):
        asked.extend(questions)
        assert temperature == 1.0 and n == 3  # draws from the LLM's own distribution
        return rows[:len(questions)]

    monkeypatch.setattr(kept, "chat_answers", answers)
    got = rehearsal.rehearsal_examples(None, _Tokenizer(), ["q0", "q1", "q2"], max_new_tokens=3, samples=2)
    assert asked == ["q0", "q0", "q1", "q1", "q2", "q2"]
    assert [(e.turns[0].text, e.turns[1].text) for e in got] == [("q0", "w5 w6"), ("q2", "w4"), ("q2", "w3")]
    assert all(not e.videos and e.turns[1].role == "ai" for e in got)
    monkeypatch.setattr(kept, "chat_answers", lambda lm, tok, questions, n, **kw: [[7, 8, 9]] * len(questions))
    with pytest.raises(ValueError, match="no rehearsal answer ended within 3 tokens"):
        rehearsal.rehearsal_examples(None, _Tokenizer(), ["q"], max_new_tokens=3)


def _world_manifest(root):
    import json
    (root / "data" / "videos").mkdir(parents=True)
    lines = []
    for i in range(30):
        conv = [{"from": "human", "value": f"make clip {i}"}, {"from": "ai", "value": "Sure"}]
        row = {"id": f"stage2-{i:06d}", "conversation": conv}
        if i % 3 == 0:
            row = {"id": f"stage2-video-{i:06d}", "videos": [f"videos/v{i}.mp4"],
                   "conversation": [{"from": "human", "video": 0}, *conv]}
            (root / "data" / "videos" / f"v{i}.mp4").write_bytes(b"x")
        lines.append(json.dumps(row))
    (root / "data" / "stage2.jsonl").write_text("\n".join(lines) + "\n")
    return root / "data" / "stage2.jsonl"


def test_mixed_manifest_holds_the_share_and_finds_the_world_videos(tmp_path, monkeypatch):
    world = _world_manifest(tmp_path)
    monkeypatch.setattr(kept, "chat_answers", lambda lm, tok, questions, n, **kw: [[4, 2]] * len(questions))
    ex = rehearsal.rehearsal_examples(None, _Tokenizer(), ["qa", "qb", "qc", "qd"])
    out = tmp_path / "run" / "smollm2" / "stage2_mixed.jsonl"
    out.parent.mkdir(parents=True)
    rehearsal.mixed_manifest(world, ex, out, 0.25, seed=0)
    rows = read_manifest(out)
    mine = [r for r in rows if r.id.startswith("rehearsal")]
    assert len(rows) == 40 and len(mine) == 10 and len({r.id for r in rows}) == 40
    assert {r.turns[0].text for r in mine} == {"qa", "qb", "qc", "qd"}
    videos = [resolve_video_path(v, out.parent) for r in rows for v in r.videos]
    assert len(videos) == 10 and all(open(v, "rb").read() == b"x" for v in videos)
    again = tmp_path / "again.jsonl"
    rehearsal.mixed_manifest(world, ex, again, 0.25, seed=0)
    assert [r.id for r in read_manifest(again)] == [r.id for r in rows]
    assert not any(r.distill for r in rows)
    rehearsal.mixed_manifest(world, ex, again, 0.25, seed=0, distill=True)  # only the rehearsal rows are marked
    assert [r.id for r in read_manifest(again) if r.distill] == [r.id for r in mine]
    assert {r.template for r in rows} == {"gpt4video"}
    rehearsal.mixed_manifest(world, ex, again, 0.25, seed=0, own_template=0.5)  # half the rehearsal rows, seeded
    own = [r for r in read_manifest(again) if r.template == "llm"]
    assert len(own) == 5 and all(r.id.startswith("rehearsal") for r in own)
    rehearsal.mixed_manifest(world, ex, tmp_path / "third.jsonl", 0.25, seed=0, own_template=0.5)
    assert [r.id for r in read_manifest(tmp_path / "third.jsonl") if r.template == "llm"] == [r.id for r in own]
    with pytest.raises(ValueError, match="fraction"):
        rehearsal.mixed_manifest(world, ex, again, 1.0, seed=0)
    with pytest.raises(ValueError, match="own template"):
        rehearsal.mixed_manifest(world, ex, again, 0.25, seed=0, own_template=1.5)


def test_sweep_variants_parse_with_defaults_and_refuse_what_is_not_a_setting():
    from g4v_jax.world.stage2_sweep import Variant, parse_variant, table

    base = Variant(3e-4, 120, 0.25, 1.0)
    v = parse_variant("lr=1e-3,steps=40,rehearsal=0", base)
    assert v == Variant(1e-3, 40, 0.0, 1.0) and v.name == "lr0.001_steps40_rehearsal0_t1"
    assert parse_variant("", base) == base
    kl = parse_variant("distill=0.5", base)
    assert kl.distill == 0.5 and kl.name == "lr0.0003_steps120_rehearsal0.25_t1_kl0.5"
    distilling = Variant(3e-4, 160, 0.25, 1.0, 1.0)  # the defaults when the chosen setting distils
    assert parse_variant("rehearsal=0", distilling).distill == 0.0  # no rehearsal rows, nothing to distil on
    assert parse_variant("steps=120", distilling).name == "lr0.0003_steps120_rehearsal0.25_t1_kl1"
    own = parse_variant("own=0.5", distilling)
    assert own.own == 0.5 and own.name == "lr0.0003_steps160_rehearsal0.25_t1_kl1_own0.5"
    assert parse_variant("rehearsal=0", dataclasses.replace(distilling, own=0.5)).own == 0.0
    lora = parse_variant("targets=v+q,rank=8,alpha=8", distilling)  # the GPT4Video release's projections
    assert (lora.targets, lora.rank, lora.alpha) == ("q+v", 8, 8.0)
    assert lora.name == "lr0.0003_steps160_rehearsal0.25_t1_kl1_loraq+v_r8_a8"
    from g4v_jax.world.pretrained import PRETRAINED_FULL  # a variant's stage 2 is the demo's, with its settings

    run = lora.size(PRETRAINED_FULL).stage2_overrides()
    assert run[-3:] == ["model.lora.targets=[q_proj,v_proj]", "model.lora.rank=8", "model.lora.alpha=8"]
    assert "train.learning_rate=0.0003" in run and "train.distill_weight=1.0" in run
    assert f"train.grad_accum_steps={PRETRAINED_FULL.stage2_micro_batches}" in run
    assert parse_variant("rank=4", distilling).size(PRETRAINED_FULL).stage2_overrides()[-1] == "model.lora.rank=4"
    assert Variant.of(PRETRAINED_FULL).size(PRETRAINED_FULL) == PRETRAINED_FULL  # the chosen setting, round trip
    assert Variant.of(lora.size(PRETRAINED_FULL)) == lora
    for bad, why in (("lr=0", "lr > 0"), ("steps=x", "not a number"), ("batch=4", "keys lr, steps"),
                     ("rehearsal=1", "rehearsal < 1"), ("temperature=0.5", "temperature 0 or 1"), ("lr", "keys"),
                     ("distill=-1", "distill >= 0"), ("rehearsal=0,distill=1", "rehearsal > 0 with distill"),
                     ("own=2", "0 <= own <= 1"), ("rehearsal=0,own=1", "rehearsal > 0 with distill or own"),
                     ("targets=q+x", "distinct projections"), ("targets=q+q", "distinct projections"),
                     ("targets=", "distinct projections"), ("rank=0", "rank >= 1"), ("rank=2.5", "not a number"),
                     ("alpha=0", "alpha > 0"), ("alpha=nan", "not a finite number"),
                     ("lr=inf", "not a finite number")):
        with pytest.raises(ValueError, match=why):
            parse_variant(bad, base)
    row = {"variant": {"lr": 3e-4, "steps": 40, "rehearsal": 0.0, "temperature": 1.0}, "stage2_last_loss": 0.46,
           "generation_tags": 0.958, "VG_f1": 0.0, "lookalike_precision": 0.0, "VG_second_turn_f1": 0.0, "VU_f1": 1.0,
           "perplexity_before": 22.8, "perplexity_after": 23.5,
           "perplexity_rise": 0.03, "right_before": 10, "right_after": 10, "kept": True}
    assert ("| 0.0003, 40 | none | 0.460 | 95.8 | 0.0 (0.0) | 0.0 | 100.0 | 22.8 -> 23.5 (+3.0%) | 10 -> 10 of 12 | "
            "kept |") in table([row])
    row["variant"] = {**row["variant"], "rehearsal": 0.25, "distill": 1.0}
    assert "| 0.0003, 40 | 0.25, T=1, KL x 1 | 0.460 |" in table([row])
    row["variant"]["own"] = 0.5
    assert "| 0.0003, 40 | 0.25, T=1, KL x 1, 0.5 in its own template | 0.460 |" in table([row])
    row["variant"].update(targets="q+v", rank=8, alpha=None)
    assert "| 0.0003, 40 (q+v, r 8) | 0.25, T=1, KL x 1, 0.5 in its own template | 0.460 |" in table([row])
    row["variant"].update(targets=None, alpha=32.0)
    assert "| 0.0003, 40 (r 8, alpha 32) |" in table([row])


def test_the_sweep_measures_the_untuned_llm_once_per_sweep_folder(tmp_path, monkeypatch):
    import g4v_jax
    from g4v_jax.data import tokenizer
    from g4v_jax.world import stage2_sweep

    loads = []
    monkeypatch.setattr(g4v_jax, "load", lambda path, overrides=(): loads.append(path) or "model")
    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda path: "tokenizer")
    monkeypatch.setattr(kept, "measure_ours", lambda model, tok: {"perplexity": 22.8, "answers": ["Paris"],
                                                                  "tokens": [[1, 2]], "right": 1})
    first = stage2_sweep.measure_before(tmp_path)
    assert stage2_sweep.measure_before(tmp_path) == first and loads == [tmp_path / "llm"]
    assert (tmp_path / "sweep" / "before.json").is_file()
