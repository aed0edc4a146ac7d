"""Tests for g4v_jax.data.manifest: schema validation (errors name file:line), write/read round trip, stage-2 caption
replacement, the VideoChat-11K and GPT4Video-50k converters on small fake inputs, and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from g4v_jax.data.manifest import (
    DESCRIBE_INSTRUCTION,
    Example,
    ManifestError,
    from_gpt4video50k,
    from_videochat11k,
    main,
    read_manifest,
    replace_videos_with_captions,
    write_manifest,
)
from g4v_jax.data.io import resolve_video_path
from g4v_jax.data.template import Turn

GOOD = {
    "id": "vc11k-000123",
    "videos": ["videos/abc.mp4"],
    "captions": ["a man rides a horse on a beach"],
    "conversation": [
        {"from": "human", "video": 0},
        {"from": "human", "value": "Describe the video in detail."},
        {"from": "ai", "value": "A man rides a horse."},
    ],
    "safety": "safe",
}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def with_(**changes) -> dict:
    return {**GOOD, **changes}


# --------------------------------------------------------------------------------------------------------------------
# reading and validation
# --------------------------------------------------------------------------------------------------------------------


def test_read_good_manifest(tmp_path):
    text_only = {"id": "t1", "conversation": [{"from": "human", "value": "Hi"}, {"from": "ai", "value": "Hello."}]}
    path = write_lines(tmp_path / "m.jsonl", [GOOD, "", text_only])  # blank lines are ignored
    a, b = read_manifest(path)
    assert a == Example(
        id="vc11k-000123",
        videos=("videos/abc.mp4",),
        captions=("a man rides a horse on a beach",),
        turns=(Turn("human", video=0), Turn("human", "Describe the video in detail."),
               Turn("ai", "A man rides a horse.")),
        safety="safe",
    )
    assert b == Example(id="t1", videos=(), captions=(), turns=(Turn("human", "Hi"), Turn("ai", "Hello.")), safety=None)
    assert resolve_video_path(a.videos[0], tmp_path) == os.path.join(str(tmp_path), "videos/abc.mp4")
    assert resolve_video_path("/abs/v.mp4", tmp_path) == "/abs/v.mp4"


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (with_(id=""), "\"id\" must be a non-empty string"),
    ({k: v for k, v in GOOD.items() if k != "id"}, "\"id\" must be a non-empty string"),
    (with_(caption=["typo"]), "unknown key(s) ['caption']"),
    (with_(conversation=[]), "non-empty list of turns"),
    (with_(conversation=[{"from": "gpt", "value": "x"}]), "unknown role 'gpt'"),
    (with_(conversation=[{"from": "human", "video": 1}, {"from": "ai", "value": "x"}]), "video index 1 out of range"),
    (with_(conversation=[{"from": "human", "video": 0, "value": "x"}]), "both \"video\" and \"value\""),
    (with_(conversation=[{"from": "ai", "video": 0}]), "only human turns can be videos"),
    (with_(conversation=[{"from": "human", "video": True}]), "must be an integer index"),
    (with_(conversation=[{"from": "human", "value": "  "}]), "non-empty string"),
    (with_(conversation=[{"from": "ai", "value": "no video turn"}]), "each exactly once"),
    (with_(videos=["a.mp4", "b.mp4"], captions=["a", "b"],
           conversation=[{"from": "human", "video": 1}, {"from": "human", "video": 0}]), "in order"),
    (with_(captions=["one", "two"]), "2 caption(s) for 1 video(s)"),
    (with_(videos="a.mp4"), "'videos' must be a list of non-empty strings"),
    (with_(safety="unsafe"), "\"safety\" must be one of ['safe', 'harmful']"),
    (with_(distill="yes"), "\"distill\" must be true or false, got 'yes'"),
    (with_(template="chatml"), "\"template\" must be one of ['gpt4video', 'llm'], got 'chatml'"),
    (with_(template="llm"), "is text only; it has videos"),
]


@pytest.mark.parametrize("bad,expected", BAD_LINES, ids=[e for _, e in BAD_LINES])
def test_validation_errors_name_file_and_line(tmp_path, bad, expected):
    path = write_lines(tmp_path / "m.jsonl", [GOOD, "", with_(id="second"), bad])
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert str(err.value).startswith(f"{path}:4: ")
    assert expected in str(err.value)
    assert err.value.__cause__ is None  # a user mistake: one clear message, no chained traceback from json/template


def test_duplicate_id_and_missing_file(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [GOOD, GOOD])
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: duplicate id 'vc11k-000123' \(first on line 1\)"):
        read_manifest(path)
    with pytest.raises(ManifestError, match=r"manifest .*nope\.jsonl' not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_write_read_round_trip(tmp_path):
    examples = [
        Example("a", ("v1.mp4", "/abs/v2.mp4"), ("first clip", "second clip"),
                (Turn("human", video=0), Turn("human", video=1), Turn("human", "Compare them ünïcode 🎬"),
                 Turn("ai", "The second is faster.")), "harmful"),
        Example("b", (), (), (Turn("human", "Make a video of a cat."), Turn("ai", "Sure."), Turn("ai", "More.")), None),
        Example("d", (), (), (Turn("human", "What is gravity?"), Turn("ai", "A force.")), None, distill=True),
        Example("e", (), (), (Turn("human", "What is gravity?"), Turn("ai", "A force.")), None, template="llm"),
        Example("c", ("x.mp4",), (), (Turn("human", "Before the video:"), Turn("human", video=0), Turn("ai", "Ok.")),
                "safe"),
    ]
    path = tmp_path / "sub" / "out.jsonl"
    write_manifest(path, examples)
    assert read_manifest(path) == examples
    assert not (tmp_path / "sub" / "out.jsonl.tmp").exists()
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[1])
    assert set(first) == {"id", "conversation"}  # empty optional fields are omitted


# --------------------------------------------------------------------------------------------------------------------
# stage 2
# --------------------------------------------------------------------------------------------------------------------


def test_replace_videos_with_captions_single_and_multi():
    single = Example("s", ("v.mp4",), ("a dog runs",), (Turn("human", video=0), Turn("human", "What?"),
                                                        Turn("ai", "A dog.")), "safe")
    out = replace_videos_with_captions(single)
    assert out == Example("s", (), (), (Turn("human", "<video>a dog runs</video>"), Turn("human", "What?"),
                                        Turn("ai", "A dog.")), "safe")

    multi = Example("m", ("a.mp4", "b.mp4"), ("first ", "second"),
                    (Turn("human", video=0), Turn("human", video=1), Turn("ai", "Two.")), None)
    out = replace_videos_with_captions(multi)
    assert [t.text for t in out.turns] == ["<video1>first</video1>", "<video2>second</video2>", "Two."]
    assert out.videos == () and out.captions == ()

    text_only = Example("t", (), (), (Turn("human", "Hi"), Turn("ai", "Hello.")), None)
    assert replace_videos_with_captions(text_only) is text_only
    with pytest.raises(ManifestError, match="example 'n' has 1 video.*0 caption"):
        replace_videos_with_captions(Example("n", ("v.mp4",), (), (Turn("human", video=0), Turn("ai", "x")), None))


# --------------------------------------------------------------------------------------------------------------------
# converters
# --------------------------------------------------------------------------------------------------------------------


def test_from_videochat11k(tmp_path):
    video_dir = tmp_path / "raw" / "videos"
    video_dir.mkdir(parents=True)
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        (video_dir / name).write_bytes(b"not decoded by the converter")
    entries = [
        {"video": "a.mp4", "QA": [{"q": "What is he doing?", "a": "Riding."}, {"q": "Where?", "a": "On a beach."}]},
        {"video": "b.mp4", "QA": [{"q": "", "a": "A long detailed description."}]},  # detailed-description part
        {"video": "c.mp4", "caption": "A caption-style description."},
        {"video": "b.mp4", "QA": [{"i": "Watch closely.", "q": "", "a": "Instruction in i."}]},  # VideoChat2-style
        {"video": "a.mp4", "QA": [{"q": "No answer", "a": ""}]},  # skipped: missing field
        {"QA": [{"q": "No video?", "a": "Skipped."}]},  # skipped: missing field
        {"video": "a.mp4", "QA": [{"q": "q", "a": "a"}, {"q": "", "a": "orphan answer"}]},  # skipped
        {"video": "missing.mp4", "QA": [{"q": "q", "a": "a"}]},  # skipped: no such file
        "not an object",  # skipped
    ]
    src = tmp_path / "raw" / "videochat_instruct_11k.json"
    src.write_text(json.dumps(entries))
    out = tmp_path / "manifests" / "vc11k.jsonl"
    assert from_videochat11k(src, video_dir, out) == 4

    examples = read_manifest(out)
    assert [e.id for e in examples] == ["vc11k-000000", "vc11k-000001", "vc11k-000002", "vc11k-000003"]
    first = examples[0]
    assert first.turns == (Turn("human", video=0), Turn("human", "What is he doing?"), Turn("ai", "Riding."),
                           Turn("human", "Where?"), Turn("ai", "On a beach."))
    assert Path(resolve_video_path(first.videos[0], out.parent)).resolve() == (video_dir / "a.mp4").resolve()
    assert not os.path.isabs(first.videos[0])  # relative to the manifest: the tree can move as a whole
    assert examples[1].turns[1:] == (Turn("human", DESCRIBE_INSTRUCTION), Turn("ai", "A long detailed description."))
    assert examples[2].turns[1:] == (Turn("human", DESCRIBE_INSTRUCTION), Turn("ai", "A caption-style description."))
    assert examples[3].turns[1] == Turn("human", "Watch closely.")
    assert all(e.captions == () for e in examples)

    # without the file check the entry with a missing video is kept
    assert from_videochat11k(src, video_dir, tmp_path / "all.jsonl", check_files=False) == 5


def test_from_gpt4video50k(tmp_path):
    entries = [
        {"id": "g1", "conversations": [
            {"from": "human", "value": "<video>a cat on a sofa</video> What is it?"},
            {"from": "gpt", "value": "A cat."}], "safety": "safe"},
        {"id": 7, "conversations": [
            {"from": "human", "value": "<video1>x</video1> <video2>y</video2> Compare."},
            {"from": "gpt", "value": "Different."}]},
        {"id": "g3", "conversations": [{"from": "human", "value": "Make a violent video."},
                                       {"from": "gpt", "value": "I can't help with that."}], "safety": "harmful"},
        {"id": "g1", "conversations": [{"from": "human", "value": "dup"}, {"from": "gpt", "value": "dup"}]},
        {"id": "g5", "conversations": [{"from": "system", "value": "?"}, {"from": "gpt", "value": "x"}]},
        {"id": "g6", "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "x"}]},
        {"id": "g7", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
         "safety": "unsafe"},
        {"conversations": [{"from": "human", "value": "q"}]},
        {"id": "g9", "conversations": [{"from": ["human"], "value": "q"}]},
    ]
    src = tmp_path / "g4v50k.json"
    src.write_text(json.dumps(entries))
    out = tmp_path / "g4v50k.jsonl"
    assert from_gpt4video50k(src, out) == 3
    a, b, c = read_manifest(out)
    assert a == Example("g1", (), (), (Turn("human", "<video>a cat on a sofa</video> What is it?"),
                                       Turn("ai", "A cat.")), "safe")
    assert b.id == "7" and b.turns[0].text.startswith("<video1>x</video1>") and b.safety is None
    assert c.safety == "harmful" and c.turns[1] == Turn("ai", "I can't help with that.")


def test_converters_reject_bad_input_files(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        from_gpt4video50k(tmp_path / "missing.json", tmp_path / "o.jsonl")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ManifestError, match="bad.json: not valid JSON"):
        from_videochat11k(tmp_path / "bad.json", tmp_path, tmp_path / "o.jsonl")
    (tmp_path / "obj.json").write_text('{"video": "a.mp4"}')
    with pytest.raises(ManifestError, match="expected a JSON list"):
        from_gpt4video50k(tmp_path / "obj.json", tmp_path / "o.jsonl")


def test_cli(tmp_path, capsys):
    src = tmp_path / "g.json"
    src.write_text(json.dumps([
        {"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"id": "y", "conversations": []},
    ]))
    out = tmp_path / "g.jsonl"
    assert main(["gpt4video50k", str(src), str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 1 examples to {out}; skipped 1 (1 missing_fields)"
    assert main(["check", str(out)]) == 0
    assert "1 examples, 0 videos" in capsys.readouterr().out

    (tmp_path / "v.mp4").write_bytes(b"")
    vc = tmp_path / "vc.json"
    vc.write_text(json.dumps([{"video": "v.mp4", "caption": "c"}, {"video": "w.mp4", "caption": "c"}]))
    assert main(["videochat11k", str(vc), str(tmp_path), str(tmp_path / "vc.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 examples" in printed and "skipped 1 (1 missing_video_file)" in printed

    assert main(["check", str(tmp_path / "missing.jsonl")]) == 2
    assert "error: manifest" in capsys.readouterr().err


def test_check_reports_what_training_would_skip_and_why(train_data, tmp_path, capsys):
    """`manifest check` used to call a manifest fine when training would skip some of its examples; `data.check`
    reports them."""
    import json as _json

    from g4v_jax.data.check import main

    rows = [_json.loads(line) for line in (train_data / "train.jsonl").read_text().splitlines()][:4]
    for row in rows:
        row["videos"] = [str(train_data / v) for v in row["videos"]]
    missing = dict(rows[0], id="gone", videos=[str(tmp_path / "gone.mp4")])
    chatty = dict(rows[1], id="chatty")
    chatty["conversation"] = chatty["conversation"][:2] + [{"from": "ai", "value": "and then " * 200}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\ufeff" + "\n".join(_json.dumps(r) for r in rows + [missing, chatty]) + "\n")  # with a BOM
    assert main([str(manifest), "--config", "tiny", f"train.tokenizer={train_data / 'tokenizer'}",
                 "data.seq_len=160", "model.llm.vocab_size=512"]) == 0
    out = capsys.readouterr().out
    assert "for training (stage1, data.seq_len=160): 2 of 6 examples will be skipped (1 unreadable video, 1 too long)" \
        in out
    assert "  gone: unreadable video: " in out and "gone.mp4" in out and "  chatty: too long: " in out
    assert main([str(manifest)]) == 0  # without a tokenizer: the videos only, and it says so
    out = capsys.readouterr().out
    assert "videos only: token lengths need --config" in out and "1 of 6 examples will be skipped" in out


def test_a_line_that_is_not_json_names_file_line_and_column(tmp_path, capsys):
    from g4v_jax.data.manifest import main

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "conversation": [}\n')
    assert main(["check", str(manifest)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"g4v_jax.data.manifest: error: {manifest}:1: not valid JSON (Expecting value at column 30)"
