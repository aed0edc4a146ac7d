"""The safety-data builder: RealToxicityPrompts selection (threshold, counts, seed, no text twice), refusal
validation, the flagged-video (input-side) examples, and the CLI end to end against the fake OpenAI server."""

import json
import os
import re
import sys
from pathlib import Path

import pytest

from g4v_jax.data.build import safety_data as S
from g4v_jax.data.build.endpoint import progress_path
from g4v_jax.data.build.instruct import BuildError, DialogueError
from g4v_jax.data.manifest import read_manifest, replace_videos_with_captions
from g4v_jax.safety.refusal import POLITE_REFUSAL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fake server
from fake_openai import FakeOpenAI, FakeRequest, Reply  # noqa: E402


def _rtp_line(text, sexual=None, severe=None, cont_text="and so on", cont_sexual=None, **other):
    prompt = {"text": text, "toxicity": 0.5, "severe_toxicity": severe, "sexually_explicit": sexual, "threat": None,
              "insult": 0.1, "identity_attack": None, "profanity": 0.2, "flirtation": 0.3, **other}
    return {"filename": "0001.txt", "begin": 0, "end": 10, "challenging": False, "prompt": prompt,
            "continuation": {"text": cont_text, "sexually_explicit": cont_sexual, "severe_toxicity": None}}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


RTP = [
    _rtp_line("sexual one", sexual=0.95),                      # 1
    _rtp_line("sexual two", sexual=0.91, severe=0.2),          # 2
    _rtp_line("sexual three", sexual=0.99),                    # 3
    _rtp_line("exactly at the threshold", sexual=0.9),         # 4: not "exceeding"
    _rtp_line("both high", sexual=0.97, severe=0.98),          # 5
    _rtp_line("severe one", severe=0.93),                      # 6
    _rtp_line("severe two", severe=0.95, sexual=None),         # 7
    _rtp_line("Sexual   ONE", severe=0.96),                    # 8: same text as 1 after normalising
    _rtp_line("harmless", sexual=0.01, severe=0.01),           # 9
    _rtp_line("no scores at all"),                             # 10
    _rtp_line("", sexual=0.99),                                # 11: empty text
    _rtp_line("mild prompt", cont_text="explicit continuation", cont_sexual=0.96),  # 12
]


def test_read_rtp_and_select(tmp_path):
    path = _write_jsonl(tmp_path / "rtp.jsonl", RTP)
    texts = S.read_rtp(path)
    assert len(texts) == 11 and texts[0] == S.RTPText("1", "sexual one", {
        "toxicity": 0.5, "severe_toxicity": None, "sexually_explicit": 0.95, "threat": None, "insult": 0.1,
        "identity_attack": None, "profanity": 0.2, "flirtation": 0.3})

    everything, candidates = S.select_toxic_texts(texts, per_category=100)
    assert candidates == {"sexually_explicit": 4, "severe_toxicity": 4}  # lines 1,2,3,5 and 5,6,7,8
    by_cat = {c: sorted(t.key for t in everything if t.category == c) for c in S.CATEGORIES}
    # "both high" goes to the first category; "Sexual ONE" repeats "sexual one": neither is used twice
    assert by_cat == {"sexually_explicit": ["1", "2", "3", "5"], "severe_toxicity": ["6", "7"]}
    assert all(t.score > 0.9 for t in everything)

    two, _ = S.select_toxic_texts(texts, per_category=2, seed=0)
    assert [t.category for t in two] == ["sexually_explicit"] * 2 + ["severe_toxicity"] * 2
    assert two == S.select_toxic_texts(texts, per_category=2, seed=0)[0]
    seeds = {tuple(t.key for t in S.select_toxic_texts(texts, per_category=2, seed=s)[0]) for s in range(8)}
    assert len(seeds) > 1  # the seed picks which ones
    normalised = [" ".join(t.text.split()).casefold() for t in two]
    assert len(set(normalised)) == len(normalised)

    low, cands = S.select_toxic_texts(texts, categories=["sexually_explicit"], threshold=0.95, per_category=10)
    assert sorted(t.key for t in low) == ["3", "5"] and cands == {"sexually_explicit": 2}  # 0.95 is not > 0.95

    with_cont = S.read_rtp(path, fields=["prompt", "continuation"])
    picked, _ = S.select_toxic_texts(with_cont, categories=["sexually_explicit"], per_category=10)
    assert "12c" in {t.key for t in picked} and "explicit continuation" in {t.text for t in picked}


def test_read_rtp_errors(tmp_path):
    for rows, msg in [([{"prompt": "text"}], r"bad\.jsonl:1: 'prompt' must be an object"),
                      ([_rtp_line("x"), _rtp_line("y", sexual="high")], r"bad\.jsonl:2: 'prompt'\.sexually_explicit: "
                                                                         r"a score must be a number"),
                      ([{"prompt": {"toxicity": 0.2}}], r":1: 'prompt': \"text\" must be a string")]:
        with pytest.raises(BuildError, match=msg):
            S.read_rtp(_write_jsonl(tmp_path / "bad.jsonl", rows))
    with pytest.raises(BuildError, match="unknown categor"):
        S.select_toxic_texts([], categories=["spiciness"])
    with pytest.raises(BuildError, match="fields"):
        S.read_rtp(tmp_path / "bad.jsonl", fields=["title"])


def test_check_refusals():
    ok = [{"from": "human", "value": "Make me a video of that."},
          {"from": "ai", "value": "I'm sorry, but I can't create that kind of content."},
          {"from": "human", "value": "Please?"}, {"from": "ai", "value": "I must decline; let's talk about else."}]
    assert S.check_refusals(ok) == ok
    for turns, reason in [
        ([ok[0], {"from": "ai", "value": "Sure! Here is a story about it..."}], "not_refusal"),
        ([ok[0], ok[1], ok[2], {"from": "ai", "value": "Fine, here you go."}], "not_refusal"),
        ([ok[0], {"from": "ai", "value": "I'm sorry, but no. <video> something </video>"}], "video_tag"),
    ]:
        with pytest.raises(DialogueError) as e:
            S.check_refusals(turns)
        assert e.value.reason == reason


def test_read_flagged(tmp_path):
    (tmp_path / "in").mkdir()
    flagged = _write_jsonl(tmp_path / "in" / "flagged.jsonl", [
        {"id": "clip1", "caption": "a  violent scene", "video": "videos/clip1.mp4"},
        {"id": 7, "caption": "an explicit scene"},
        {"id": "abs", "caption": "x", "video": "/data/abs.mp4"},
    ])
    items = S.read_flagged(flagged, tmp_path / "out" / "safety.jsonl")
    assert items[0] == S.FlaggedVideo("clip1", "a violent scene", os.path.join("..", "in", "videos", "clip1.mp4"))
    assert items[1] == S.FlaggedVideo("7", "an explicit scene", None) and items[2].video == "/data/abs.mp4"
    for rows, msg in [([{"id": "a"}], r":1: \"caption\" must be"), ([{"caption": "c"}], r":1: \"id\""),
                      ([{"id": "a", "caption": "c", "videos": ["v"]}], r":1: unknown key\(s\) \['videos'\]"),
                      ([{"id": "a", "caption": "c"}, {"id": "a", "caption": "d"}], r":2: duplicate id 'a'")]:
        with pytest.raises(BuildError, match=msg):
            S.read_flagged(_write_jsonl(tmp_path / "bad.jsonl", rows), tmp_path / "o.jsonl")


_TEXT = re.compile(r'"""(.*)"""', re.S)
_CAPTION = re.compile(r"<video> (.*?) </video>")


def safety_handler(req: FakeRequest) -> str | Reply:
    """Refusal dialogues for RTP texts ('sexual two' gets an AI turn that complies, 'severe one' a video tag,
    'sexual three' is refused by the provider's moderation); questions for flagged videos."""
    m = _TEXT.search(req.user)
    if m:
        text = m.group(1)
        if text == "sexual three":
            return Reply(400, "this prompt was flagged by moderation")
        answer = "I'm sorry, but I can't help with that request."
        if text == "sexual two":
            answer = "Sure, here is what you asked for."
        if text == "severe one":
            answer = "I'm sorry, but I cannot. <video> a calm lake </video>"
        return json.dumps([[{"speaker": "A", "text": f"Write something like: {text}"},
                            {"speaker": "B", "text": answer},
                            {"speaker": "A", "text": "Then make a video about it."},
                            {"speaker": "B", "text": "I apologize, but I won't create that video."}]])
    caption = _CAPTION.search(req.user).group(1)
    if "garbage" in caption:
        return "I will not do this."
    return '```json\n["What is happening here?", "Describe it in detail.", "what is happening  HERE?", "", ' \
           '"Show me <video> more </video>", "Make a longer version of this video."]\n```'


def test_safety_cli_end_to_end(tmp_path, capsys):
    rtp = _write_jsonl(tmp_path / "rtp.jsonl", RTP)
    flagged = _write_jsonl(tmp_path / "flagged.jsonl", [
        {"id": "clip1", "caption": "a violent scene", "video": "videos/clip1.mp4"},
        {"id": "clip2", "caption": "an explicit scene"},
        {"id": "clip3", "caption": "garbage"},
    ])
    out = tmp_path / "data" / "safety.jsonl"
    with FakeOpenAI(safety_handler) as srv:
        args = ["--url", srv.url, "--model", "gpt-test", "--out", str(out), "--rtp", str(rtp), "--per-category",
                "100", "--flagged", str(flagged), "--no-progress", "--backoff", "0", "--workers", "2"]
        assert S.main(args) == 0
        # every candidate selected: sexually_explicit 1, 2, 3, 5; severe_toxicity 6, 7 (5 taken, 8 repeats 1)
        assert srv.calls == 6 + 3
        assert S.main(args) == 0 and srv.calls == 9  # a rerun: nothing left to ask

    examples = {ex.id: ex for ex in read_manifest(out)}
    assert all(ex.safety == "harmful" for ex in examples.values())
    # 2: the AI complies; 3: the provider refuses the prompt (HTTP 400); 6: a video tag in a refusal
    assert sorted(i for i in examples if i.startswith("refuse-")) == [
        "refuse-severe_toxicity-7-0", "refuse-sexually_explicit-1-0", "refuse-sexually_explicit-5-0"]
    ex = examples["refuse-sexually_explicit-1-0"]
    assert [t.role for t in ex.turns] == ["human", "ai", "human", "ai"]
    assert ex.turns[0].text == "Write something like: sexual one"
    assert ex.turns[1].text == "I'm sorry, but I can't help with that request."

    clip1 = examples["flagged-clip1-0"]
    assert clip1.videos == (os.path.join("..", "videos", "clip1.mp4"),) and clip1.captions == ("a violent scene",)
    assert [(t.role, t.video, t.text) for t in clip1.turns] == [
        ("human", 0, ""), ("human", None, "What is happening here?"), ("ai", None, POLITE_REFUSAL)]
    assert replace_videos_with_captions(clip1).turns[0].text == "<video>a violent scene</video>"
    clip2 = examples["flagged-clip2-1"]
    assert clip2.videos == () and [t.text for t in clip2.turns] == [
        "<video>an explicit scene</video>", "Describe it in detail.", POLITE_REFUSAL]
    assert sorted(i for i in examples if i.startswith("flagged-clip1")) == [
        "flagged-clip1-0", "flagged-clip1-1", "flagged-clip1-5"]

    report = capsys.readouterr().out
    for line in ["| sexually_explicit | 4 | 4 |", "| severe_toxicity | 4 | 2 |", "3 flagged video(s)",
                 "| rejected: not_refusal | 1 |", "| rejected: http_400 | 1 |", "| rejected: video_tag | 3 |",
                 "| rejected: duplicate_question | 2 |", "| rejected: bad_question | 2 |",
                 "| rejected: no_json | 1 |", "| examples written in this run | 9 |"]:
        assert line in report, (line, report)
    progress = {p["request"]: p for p in map(json.loads, progress_path(out).read_text().splitlines())}
    assert len(progress) == 9 and progress["refuse-sexually_explicit-2"]["rejected"] == {"not_refusal": 1}


def test_safety_cli_needs_an_input(tmp_path):
    with pytest.raises(SystemExit):
        S.main(["--url", "http://127.0.0.1:9", "--model", "m", "--out", str(tmp_path / "o.jsonl")])
