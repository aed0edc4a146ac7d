"""Video captioning evaluation: coco-caption BLEU-4 / METEOR on captions with known answers (checked against
sacrebleu where the two must agree), the PTB tokenisation, the missing-Java error, data validation, the MSR-VTT
converter, and the runner end to end with a stubbed model.

METEOR's Java process takes seconds to start, so one module-scoped scorer serves every test that needs it."""

import contextlib
import json
import math
import shutil
from pathlib import Path

import pytest

from g4v_jax.eval import caption as C


@pytest.fixture(scope="module")
def meteor():
    with C.meteor_scorer() as m:
        yield m


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------------------------

REFS = {
    "same": ["A man is singing a song on stage.", "a man sings"],
    "unrelated": ["a dog runs in a park", "a dog is running on the grass"],
    "close": ["a cat is sleeping on a sofa", "the cat sleeps"],
    "missing": ["a woman cooks pasta in a kitchen"],
}


def test_identical_predictions_score_one(meteor):
    preds = {vid: refs[0] for vid, refs in REFS.items()}
    m = C.score_captions(preds, REFS, meteor=meteor)
    assert m["n"] == 4 and m["unanswered"] == 0
    assert m["bleu4"] == pytest.approx(1.0, abs=1e-6) and m["bleu"] == pytest.approx([1.0] * 4, abs=1e-6)
    assert m["meteor"] > 0.95 and m["bleu4_sacrebleu"] == pytest.approx(1.0, abs=1e-6)
    assert m["sacrebleu_signature"].startswith("nrefs:var|case:lc|eff:no|tok:13a|smooth:exp")


def test_wrong_and_unanswered_predictions_score_lower(meteor):
    # case and punctuation do not matter (PTB tokenisation, lowercased, punctuation dropped); ids may be any keys
    preds = {"same": "a MAN is singing a song, on stage!", "unrelated": "the stock market fell sharply today",
             "close": "a cat is lying on a couch"}  # "missing" is unanswered
    m = C.score_captions(preds, REFS, meteor=meteor)
    v = m["per_video"]
    assert m["unanswered"] == 1 and m["n"] == 4
    assert v["same"]["bleu4"] == pytest.approx(1.0, abs=1e-6) and v["same"]["meteor"] > 0.95
    assert v["unrelated"]["bleu4"] < 1e-6 and v["unrelated"]["meteor"] < 0.1  # "the" matches
    assert v["missing"] == {"bleu4": 0.0, "meteor": 0.0}  # scored as the empty caption
    assert v["unrelated"]["meteor"] < v["close"]["meteor"] < v["same"]["meteor"]
    assert 0.05 < m["bleu4"] < 0.9 and 0.05 < m["meteor"] < 0.9
    assert m["bleu4_sacrebleu"] < 0.9


def test_coco_bleu4_agrees_with_sacrebleu(meteor):
    # lowercase words without punctuation tokenise alike in PTB and 13a, and every n-gram order has matches, so the
    # two BLEU-4s differ only by coco's 1e-9 smoothing; the predictions are short, so the brevity penalty is active
    refs = {"a": ["a man is playing a guitar on the big stage", "a man plays a guitar for a crowd of people"],
            "b": ["a woman is cooking pasta in a small kitchen", "someone is cooking food in the kitchen"],
            "c": ["two dogs are running across a green field", "two brown dogs run in the green grass"]}
    preds = {"a": "a man is playing a guitar", "b": "a woman is cooking in a kitchen", "c": "two dogs are running"}
    m = C.score_captions(preds, refs, meteor=meteor)
    assert m["bleu4"] == pytest.approx(m["bleu4_sacrebleu"], abs=1e-6)
    assert 0.2 < m["bleu4"] < 0.9
    # by hand: c = 6 + 7 + 4 = 17 tokens against the closest reference lengths r = 10 + 7 + 8 = 25;
    # p1..p4 = 17/17, 12/14, 8/11, 5/8 (clipped matches / candidate n-grams summed over the three videos)
    p = [17 / 17, 12 / 14, 8 / 11, 5 / 8]
    expected = (p[0] * p[1] * p[2] * p[3]) ** 0.25 * math.exp(1 - 25 / 17)
    assert m["bleu4"] == pytest.approx(expected, abs=1e-6)


def test_ptb_tokenize_keeps_one_line_per_caption():
    texts = ["A man, singing!", "it's a dog's life.", "x\ry", "...", "", "one\u2028two", "a ||| b"]
    assert C.ptb_tokenize(texts) == ["a man singing", "it 's a dog 's life", "x y", "", "", "one two", "a b"]


def test_score_captions_rejects_bad_input():
    with pytest.raises(ValueError, match="without references.*'x'"):
        C.score_captions({"x": "a"}, {"a": ["ref"]})
    with pytest.raises(ValueError, match=r"references\['a'\] must be a non-empty list"):
        C.score_captions({}, {"a": []})
    with pytest.raises(ValueError, match=r"references\['a'\] must be a non-empty list"):
        C.score_captions({}, {"a": "a single string"})
    with pytest.raises(ValueError, match=r"references\['a'\] has an empty"):
        C.score_captions({}, {"a": ["ok", "  "]})
    with pytest.raises(ValueError, match=r"predictions\['a'\] must be a string"):
        C.score_captions({"a": 3}, {"a": ["ok"]})
    with pytest.raises(ValueError, match="no references"):
        C.score_captions({}, {})


def _no_java(monkeypatch):
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else which(name, *a, **k))


def test_missing_java_is_a_clear_error(monkeypatch, tmp_path):
    import g4v_jax

    _no_java(monkeypatch)
    with pytest.raises(C.JavaNotFoundError, match="no `java` is on PATH.*apt-get install openjdk-17-jre-headless"):
        C.score_captions({"a": "a man"}, {"a": ["a man"]})
    with pytest.raises(C.JavaNotFoundError):
        with C.meteor_scorer():
            pass

    # the runner says so before it loads a model and captions anything
    monkeypatch.setattr(g4v_jax, "load", lambda *a, **k: pytest.fail("loaded a model without Java"))
    data = _write_jsonl(tmp_path / "c.jsonl", [{"id": "v", "video": "v.mp4", "captions": ["a man"]}])
    with pytest.raises(SystemExit, match="error: .*openjdk-17-jre-headless"):
        C.main(["--ckpt", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "out")])


# --------------------------------------------------------------------------------------------------------------------
# data and converter
# --------------------------------------------------------------------------------------------------------------------


def test_read_captions_validation(tmp_path):
    good = _write_jsonl(tmp_path / "ok.jsonl", [
        {"id": "video7010", "video": "videos/video7010.mp4", "captions": [" a man sings ", "a man is singing"]},
        {"video": "/abs/b.mp4", "captions": ["b"]},  # id defaults to the line number
    ])
    a, b = C.read_captions(good)
    assert a == C.CaptionItem("video7010", str(tmp_path / "videos/video7010.mp4"), ("a man sings", "a man is singing"))
    assert b.id == "2" and b.video == "/abs/b.mp4"

    cases = [
        ({"id": "a", "video": "v", "captions": []}, "captions must be a non-empty list"),
        ({"id": "a", "video": "v", "captions": "a man"}, "captions must be a non-empty list"),
        ({"id": "a", "video": "v", "captions": ["ok", ""]}, r"captions\[1\] must be a non-empty string"),
        ({"id": "a", "video": "v", "captions": ["ok", 3]}, r"captions\[1\] must be a non-empty string"),
        ({"id": "a", "captions": ["ok"]}, "video must be a non-empty path"),
        ({"id": ["a"], "video": "v", "captions": ["ok"]}, "\"id\" must be"),
        ({"id": "a", "video": "v", "captions": ["ok"], "caption": "x"}, "unknown key"),
    ]
    bad = tmp_path / "bad.jsonl"
    for row, msg in cases:
        _write_jsonl(bad, [{"id": "first", "video": "v", "captions": ["ok"]}, row])
        with pytest.raises(C.CaptionError, match=f"{bad}:2: {msg}"):
            C.read_captions(bad)
    _write_jsonl(bad, [{"id": "a", "video": "v", "captions": ["x"]}, {"id": "a", "video": "w", "captions": ["y"]}])
    with pytest.raises(C.CaptionError, match=f"{bad}:2: duplicate id 'a' \\(first on line 1\\)"):
        C.read_captions(bad)
    bad.write_text('{"id": "a", "video": "v", "captions": ["x"]}\n{not json\n')
    with pytest.raises(C.CaptionError, match=f"{bad}:2: not valid JSON"):
        C.read_captions(bad)
    bad.write_text("\n")
    with pytest.raises(C.CaptionError, match="no videos"):
        C.read_captions(bad)


def _msrvtt_json(path):
    path.write_text(json.dumps({
        "info": {"contributor": "Microsoft MSM group"},
        "videos": [
            {"category": 9, "url": "u", "video_id": "video0", "start time": 1.0, "end time": 5.0, "split": "train",
             "id": 0},
            {"category": 1, "url": "u", "video_id": "video7010", "split": "test", "id": 7010},
            {"category": 2, "url": "u", "video_id": "video7011", "split": "test", "id": 7011},  # no file
            {"category": 3, "url": "u", "video_id": "video7012", "split": "test", "id": 7012},  # no captions
            {"category": 4, "url": "u", "video_id": "video7013", "split": "test", "id": 7013},  # an .avi
        ],
        "sentences": [
            {"caption": "a man is singing on stage", "video_id": "video7010", "sen_id": 140200},
            {"caption": "a cartoon plays", "video_id": "video0", "sen_id": 0},
            {"caption": "  a singer performs  ", "video_id": "video7010", "sen_id": 140201},
            {"caption": "", "video_id": "video7013", "sen_id": 140202},
            {"caption": "a car drives", "video_id": "video7011", "sen_id": 140203},
            {"caption": "a dog barks", "video_id": "video7013", "sen_id": 140204},
        ],
    }))
    return path


def test_from_msrvtt(tmp_path, capsys):
    vids = tmp_path / "TestVideo"
    vids.mkdir()
    for name in ["video0.mp4", "video7010.mp4", "video7012.mp4", "video7013.avi"]:
        (vids / name).write_bytes(b"x")
    src = _msrvtt_json(tmp_path / "test_videodatainfo.json")
    out = tmp_path / "data" / "msrvtt_test.jsonl"

    assert C.from_msrvtt(src, vids, out) == 2
    items = C.read_captions(out)
    assert [(i.id, i.captions) for i in items] == [("video7010", ("a man is singing on stage", "a singer performs")),
                                                   ("video7013", ("a dog barks",))]
    assert Path(items[0].video).resolve() == (vids / "video7010.mp4").resolve()
    assert Path(items[1].video).resolve() == (vids / "video7013.avi").resolve()
    assert json.loads(out.read_text().splitlines()[0])["video"] == "../TestVideo/video7010.mp4"  # relative to out

    C.main(["convert", str(src), str(vids), str(out), "--split", "all", "--no-check-files"])
    assert "wrote 4 videos" in capsys.readouterr().out
    assert [i.id for i in C.read_captions(out)] == ["video0", "video7010", "video7011", "video7013"]
    assert Path(C.read_captions(out)[2].video).name == "video7011.mp4"

    with pytest.raises(C.CaptionError, match=r"no videos in split 'val' \(splits present: \['test', 'train'\]\)"):
        C.from_msrvtt(src, vids, out, split="val")
    with pytest.raises(SystemExit, match="'sentences' must be a list"):
        (tmp_path / "bad.json").write_text(json.dumps({"videos": []}))
        C.main(["convert", str(tmp_path / "bad.json"), str(vids), str(out)])


# --------------------------------------------------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------------------------------------------------


def test_runner_end_to_end_with_stubbed_model(tmp_path, monkeypatch, meteor):
    import g4v_jax
    import g4v_jax.data.tokenizer

    data = _write_jsonl(tmp_path / "msrvtt.jsonl", [
        {"id": "video7010", "video": "videos/a.mp4", "captions": ["a man is singing on stage", "a man sings"]},
        {"id": "video7011", "video": "videos/b.mp4", "captions": ["a dog runs in a park"]},
        {"id": "video7012", "video": "videos/broken.mp4", "captions": ["a woman cooks pasta"]},
    ])
    canned = {"video7010": "A man is singing on stage.", "video7011": "A cat sleeps."}
    seen = []

    def fake_answer_requests(model, tokenizer, requests, **kw):
        seen.append((requests, kw))
        return [{"id": r["id"], "answer": canned[r["id"]]} if r["id"] in canned
                else {"id": r["id"], "error": "cannot read video"} for r in requests]

    @contextlib.contextmanager
    def shared_meteor():
        yield meteor

    monkeypatch.setattr("g4v_jax.inference.answer_requests", fake_answer_requests)
    monkeypatch.setattr(g4v_jax, "load", lambda ckpt, overrides=(): object())
    monkeypatch.setattr(C, "load_tokenizer", lambda path: object())
    monkeypatch.setattr(C, "meteor_scorer", shared_meteor)

    out = tmp_path / "report"
    C.main(["--ckpt", str(tmp_path / "ckpt"), "--data", str(data), "--out", str(out), "--max-new-tokens", "24",
            "--batch-size", "2"])
    (reqs, kw), = seen
    assert [r["id"] for r in reqs] == ["video7010", "video7011", "video7012"]
    assert reqs[0]["turns"] == [{"from": "human", "video": 0}, {"from": "human", "value": C.INSTRUCTION}]
    assert reqs[0]["videos"] == [str(tmp_path / "videos/a.mp4")]
    assert kw["sampling"].max_new_tokens == 24 and kw["sampling"].temperature == 0 and kw["batch_size"] == 2

    rep = json.loads((out / "report.json").read_text())
    assert rep["samples"] == 3 and rep["data_sha256"] == C.sha256_of(data) and rep["data"] == str(data)
    assert rep["instruction"] == C.INSTRUCTION and rep["generation"] == {"decoding": "greedy", "max_new_tokens": 24}
    assert set(rep["metric_definitions"]) == set(C.METRICS) and "0-1 scale" in rep["metric_definitions"]["bleu4"]
    assert rep["model_errors"] == {"video7012": "cannot read video"}
    m = rep["metrics"]
    assert m["n"] == 3 and m["unanswered"] == 1 and "per_video" not in m
    # the same numbers as scoring the predictions directly, with the error as a missing prediction
    direct = C.score_captions(canned, {"video7010": ["a man is singing on stage", "a man sings"],
                                       "video7011": ["a dog runs in a park"], "video7012": ["a woman cooks pasta"]},
                              meteor=meteor)
    assert m["bleu4"] == pytest.approx(direct["bleu4"]) and m["meteor"] == pytest.approx(direct["meteor"])
    assert 0 < m["meteor"] < 1 and 0 <= m["bleu4"] < 1
    recs = {r["id"]: r for r in rep["records"]}
    assert recs["video7010"]["prediction"] == "A man is singing on stage." and recs["video7010"]["meteor"] > 0.95
    assert recs["video7010"]["references"] == ["a man is singing on stage", "a man sings"]
    assert recs["video7012"]["prediction"] is None and recs["video7012"]["error"] == "cannot read video"
    md = (out / "report.md").read_text()
    assert "| Method | N | BLEU-4 | METEOR | BLEU-4 (sacrebleu) |" in md
    assert f"| ckpt | 3 | {m['bleu4']:.3f} | {m['meteor']:.3f} | {m['bleu4_sacrebleu']:.3f} |" in md
    assert "Unanswered (scored as empty captions): 1" in md and m["sacrebleu_signature"] in md

    # another instruction is sent as given
    seen.clear()
    C.main(["--ckpt", str(tmp_path / "ckpt"), "--data", str(data), "--out", str(out), "--instruction", "Caption it."])
    assert seen[0][0][1]["turns"][1] == {"from": "human", "value": "Caption it."}
    assert json.loads((out / "report.json").read_text())["instruction"] == "Caption it."
