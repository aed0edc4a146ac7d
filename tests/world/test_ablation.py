"""The Table 5 ablation in its quick form (the demo's quick world, a few stage-1 steps): every variant trains stage 1
from the same tower and stage-0 LLM and is judged; the table has the paper's rows, each with its own token count."""

import json

import numpy as np
import pytest

from g4v_jax.weights import load, named_params
from g4v_jax.world import ablation


def test_every_variant_trains_from_the_same_stage0_and_is_reported(tmp_path, capsys):
    assert ablation.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "| 4 | Spatio-temporal pooling" in capsys.readouterr().out
    out = tmp_path / "seed0"
    rows = json.loads((tmp_path / "ablation.json").read_text())["seeds"]["0"]
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["video_tokens"] for r in rows] == [32, 32, 32, 64, 4 + 36]
    assert [r["seq_len"] for r in rows] == [144, 144, 144, 208, 160]
    params = [r["abstractor_params"] for r in rows]
    assert params[1] < params[0] and params[4] == 96 * 128 + 128 + 4 * 96 and params[3] - params[2] == 32 * 96
    for r in rows:
        assert r["steps"] == ablation.QUICK_STEPS and r["step_seconds"] > 0
        assert r["captions"] > 0 and r["caption_errors"] == 0
        assert 0 <= r["qa"] <= 1 and 0 <= r["bleu4"] <= 1 and 0 <= r["meteor"] <= 1
        assert set(r["qa_by_type"]) <= set(ablation.QA_TYPES)
    # every variant's stage 1 started from the same stage-0 LLM and tower: its init directory holds them unchanged
    stage0 = named_params(load(out / "stage0" / "final"))
    init = named_params(load(out / "ablation" / "v3" / "init"))
    for name in ("language_model.embed_tokens", "vision_model.post_layernorm.scale"):
        np.testing.assert_array_equal(np.asarray(init[name]), np.asarray(stage0[name]))
    # a finished variant is kept: a second call reads its result instead of training again; its step times then
    # come from short runs back to back (the full run's way), which leave nothing behind
    again = ablation.run_seed(out, 0, ablation.VARIANTS[:2], size=ablation.QUICK_SIZE, steps=ablation.QUICK_STEPS,
                              eval_split="test", progress=False, timing_steps=4)
    assert [{**r, "step_seconds": None} for r in again] == [{**r, "step_seconds": None} for r in rows[:2]]
    timing = json.loads((out / "ablation" / "timing.json").read_text())
    assert set(timing) == {"0", "1"} and [r["step_seconds"] for r in again] == [timing["0"], timing["1"]]
    assert all(t > 0 for t in timing.values()) and not list((out / "ablation").glob("v*/timing"))
    report = ablation.markdown_report({0: rows, 1: rows})
    assert "Mean over seeds 0, 1" in report and "| 4 | Spatio-temporal pooling" in report
    assert report.count("| 3 | Q-Former, 64 queries | 64 |") == 3  # the mean table and both seeds'
    assert json.loads(json.dumps(rows))  # the JSON report can hold them


def test_the_ranking_is_compared_with_the_papers_table_5():
    rows = [{"index": i, "meteor": m, "bleu4": b, "qa": q} for i, m, b, q in
            [(0, 0.5, 0.4, 0.6), (1, 0.1, 0.1, 0.2), (2, 0.2, 0.2, 0.3), (3, 0.4, 0.35, 0.5), (4, 0.3, 0.3, 0.4)]]
    lines = ablation.ranking_lines(rows)
    assert lines[0] == ("- METEOR: the paper ranks #0 > #3 > #4 > #2 > #1; the world #0 > #3 > #4 > #2 > #1 "
                        "(Spearman +1.00)")
    reversed_rows = [{**r, "meteor": 1 - r["meteor"]} for r in rows]
    assert "(Spearman -1.00)" in ablation.ranking_lines(reversed_rows)[0]
    assert lines[2] == "- Video QA on the world: #0 > #3 > #4 > #2 > #1"
