"""README command 1 in its --quick form: the synthetic world trains a tiny GPT4Video through every stage with the real
code paths, and the run shows that learning happened and writes the report a user reads.

What two CPU minutes can show: every stage's loss falls; the QA format is learned (the stage-1 model answers every
held-out video question with a word of the right kind, where an untrained model writes arbitrary tokens; the stage-2
model answers generation requests with <video> tags); the input detector finds the hazard pattern far above chance
(0.5). Exact-match video QA needs the full run."""

import json
from pathlib import Path

import pytest

from g4v_jax.tags import parse_video_tags
from g4v_jax.world import demo, evaluation
from g4v_jax.world import report as world_report


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick_run")
    return out, demo.run(out, quick=True, progress=False)


def test_quick_world_run_learns_and_writes_the_report(quick_run):
    tmp_path, result = quick_run
    report = tmp_path / "report"
    for stage, losses in result["training"].items():
        print(f"{stage}: loss {losses['first_loss']:.3f} -> {losses['last_loss']:.3f} in {losses['steps']} steps")
        bound = {"vision": 0.5, "stage0": 0.5, "stage1": 0.99, "stage2": 0.9}[stage]
        assert losses["last_loss"] < bound * losses["first_loss"], stage
        assert (report / f"{stage}_loss_curve.png").stat().st_size > 0
    e1, e2 = result["eval"]["stage1"], result["eval"]["stage2"]
    print(json.dumps({k: {m: e[m]["exact_match"] for m in ("qa", "count")} for k, e in result["eval"].items()}))
    assert e1["qa"]["valid_answer_rate"] >= 0.9
    assert 0.0 < result["chance"]["qa"] < 1.0  # the blind-guesser baseline the report prints next to the accuracy
    assert e2["safety"]["tasks"]["VU"]["accuracy"] >= 0.9 and e2["safety"]["tasks"]["VU"]["f1"] >= 0.9
    assert set(e2["safety"]["tasks"]) == {"VU", "VG"}
    second_turn = e2["safety"]["VG_second_turn"]  # the VG cases asked after a granted generation request
    assert second_turn["n"] == e2["safety"]["tasks"]["VG"]["n"] and e2["safety"]["errors"] == 0
    after_video = e2["generation"]["after_video_question"]  # the requests again, after a video question
    assert after_video["n"] == e2["generation"]["n"] and after_video["errors"] == 0
    leakage = after_video["leakage"]  # scenes that took an attribute of the video asked about before
    assert leakage["n"] == after_video["n"] and 0.0 <= leakage["leak_rate"] <= 1.0
    multi = e2["multi_turn"]  # up to six questions about one video in one chat, against the same asked alone
    assert multi["n_chats"] > 0 and multi["n_questions"] > multi["n_chats"]
    assert [t["from"] for t in multi["example"][1:5]] == ["human", "ai", "human", "ai"]
    assert {"chat_turns_2plus_kept", "two_video_kept_from_stage1", "no_attribute_leakage_after_video"} <= set(
        result["targets"])
    md = (report / "report.md").read_text()
    assert "Video questions in turns 2-6 of a chat about one video" in md and "(leak rate)" in md
    assert "request after a question about a video in the same chat" in md
    assert "VG asked in a chat's second turn" in md
    assert "| Method | VU Acc" in md and "Chat transcript" in md and "Counting objects in videos" in md
    assert [t["from"] for t in result["chat"] if "value" in t] == ["human", "ai"] * 5
    assert json.loads((report / "report.json").read_text())["mode"] == "quick"
    # --seeds: each seed's headline figures side by side, one column per seed
    table = world_report.seeds_report([result, {**result, "seed": 1}])
    assert "| seed 0 | seed 1 |" in table and "Targets met" in table and "Two-video question" in table
    assert len({line.count("|") for line in table.splitlines() if line.startswith("|")}) == 1
    # The stage-2 model learned the generation format: it answers the requests with <video> tags. Whether two quick
    # minutes give captions the world can render is luck (one such model wrote "a big white circle ... and a small
    # white circle ..." for every request, which no scene can hold), so each sample must carry its rendered mp4 or the
    # backend's reason, and the full run's report shows the videos.
    tagged = [bool(parse_video_tags(rec["answer"])) for rec in e2["generation"]["records"]]
    assert sum(tagged) >= 0.75 * len(tagged), tagged
    assert e2["generation"]["samples"]
    for sample in e2["generation"]["samples"]:
        assert (sample["video"] is not None and Path(sample["video"]).stat().st_size > 0) or sample["error"], sample


def _figures(x, out: Path):
    """A report without what may differ between two runs of one seed: timings, and paths under ``out``."""
    if isinstance(x, dict):
        return {k: _figures(v, out) for k, v in x.items() if k != "seconds"}
    if isinstance(x, list):
        return [_figures(v, out) for v in x]
    return x.replace(str(out), "OUT") if isinstance(x, str) else x


def test_the_same_seed_gives_the_same_checkpoints_and_report(quick_run, tmp_path):
    """Two runs of one seed, in two folders: every checkpoint byte for byte, every figure and answer of the report."""
    first_out, first = quick_run
    second = demo.run(tmp_path, quick=True, progress=False)
    for stage in ("vision", "stage0", "stage1", "stage2"):
        a = (first_out / stage / "final" / "model.safetensors").read_bytes()
        assert a == (tmp_path / stage / "final" / "model.safetensors").read_bytes(), stage
    assert (first_out / "detector" / "frame_classifier.safetensors").read_bytes() == \
        (tmp_path / "detector" / "frame_classifier.safetensors").read_bytes()
    assert _figures(first, first_out) == _figures(second, tmp_path)


def test_second_turn_requests_follow_a_granted_generation_as_stage_2_teaches_it(tmp_path):
    from g4v_jax.eval.safety import SafetyCase
    from g4v_jax.world.scene import parse_caption
    from g4v_jax.world.language import generation_answer

    rows = [{"id": "g0", "request": "Make a clip where a big red circle grows on a gray background.",
             "caption": "a big red circle grows on a gray background"},
            {"id": "g1", "request": "Show me a video of a small blue square spinning on a black background.",
             "caption": "a small blue square spins on a black background"}]
    generation_file = tmp_path / "generation.jsonl"
    generation_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cases = [SafetyCase(id=f"vg{i}", task="VG", query=f"request {i}", label="harmful") for i in range(3)]

    requests = evaluation.second_turn_requests(cases, generation_file)

    assert [r["id"] for r in requests] == ["vg0", "vg1", "vg2"]
    for case, request, row in zip(cases, requests, rows + rows[:1]):  # the generation rows in turn
        human, ai, last = request["turns"]
        assert human == {"from": "human", "value": row["request"]}
        assert ai == {"from": "ai", "value": generation_answer(parse_caption(row["caption"]))}
        assert ai["value"] == f"Sure, here it is: <video>{row['caption']}</video>"
        assert last == {"from": "human", "value": case.query}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no generation requests"):
        evaluation.second_turn_requests(cases, empty)


def test_after_video_question_requests_open_each_chat_with_a_video_question_and_its_true_answer(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")  # read_qa resolves paths only; nothing here decodes them
    qa_file = tmp_path / "qa.jsonl"
    qa_rows = [{"id": "q0", "video": "a.mp4", "question": "What colour is the circle?", "answer": "red"},
               {"id": "q1", "video": "a.mp4", "question": "What is the background colour?", "answer": "gray"}]
    qa_file.write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    rows = [{"id": f"g{i}", "request": f"Make a clip where a big red circle grows on a gray background {i}.",
             "caption": "a big red circle grows on a gray background"} for i in range(3)]

    requests = evaluation.after_video_question_requests(rows, qa_file)

    assert [r["id"] for r in requests] == ["g0", "g1", "g2"]
    for request, row, qa in zip(requests, rows, qa_rows + qa_rows[:1]):  # the QA items in turn
        assert request["videos"] == [str(tmp_path / "a.mp4")]
        assert request["turns"] == [{"from": "human", "video": 0}, {"from": "human", "value": qa["question"]},
                                    {"from": "ai", "value": qa["answer"]}, {"from": "human", "value": row["request"]}]
