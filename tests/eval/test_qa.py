"""Video QA evaluation: offline metrics, the Video-ChatGPT judge against a fake OpenAI-compatible server (retries,
malformed replies, the cache), the converter, and the runner end to end with a stubbed model."""

import json
import sys
import threading
from pathlib import Path

import pytest

from g4v_jax.eval import judge as J
from g4v_jax.eval import qa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fake server
from fake_openai import FakeOpenAI, FakeRequest, Reply  # noqa: E402


# --------------------------------------------------------------------------------------------------------------------
# offline metrics
# --------------------------------------------------------------------------------------------------------------------


def test_normalize_exact_and_contains():
    assert qa.normalize("  A Man, Singing!! ") == "a man singing"
    assert qa.exact_match("Sing.", "sing") and qa.exact_match("SING", " sing ")
    assert not qa.exact_match("singing", "sing")
    assert qa.contains_match("The man is playing a guitar.", "guitar")
    assert qa.contains_match("he plays the Guitar!", "the guitar")
    assert not qa.contains_match("a category of things", "cat")  # whole words only
    assert not qa.contains_match("the man sings", "singer")
    assert not qa.contains_match("anything", "")
    assert qa.contains_match("it's a dog", "dog") and qa.contains_match("dog", "dog")


def test_score_counts_unanswered_as_wrong():
    items = [qa.QAItem("a", "v", "q", "dog"), qa.QAItem("b", "v", "q", "cat"), qa.QAItem("c", "v", "q", "run")]
    answers = {"a": "Dog.", "b": "a black cat"}  # c unanswered
    judgements = {"a": {"pred": "yes", "score": 5}, "b": {"error": "boom"}}
    m = qa.score(items, answers, judgements)
    assert m["offline"]["exact_match"] == pytest.approx(1 / 3)
    assert m["offline"]["contains_match"] == pytest.approx(2 / 3)
    j = m["judge"]
    assert j["accuracy"] == pytest.approx(1 / 3) and j["score"] == 5.0
    assert j["judge_errors"] == 1 and j["unanswered"] == 1 and j["judged"] == 1


def test_parse_judgement():
    assert J.parse_judgement("{'pred': 'yes', 'score': 4}") == {"pred": "yes", "score": 4}
    assert J.parse_judgement('Sure! {"pred": "No", "score": "2"} done') == {"pred": "no", "score": 2}
    assert J.parse_judgement("pred: yes, score: 3") == {"pred": "yes", "score": 3}
    for bad in ["I think yes", "{'pred': 'maybe', 'score': 3}", "{'pred': 'yes', 'score': 9}", ""]:
        with pytest.raises(ValueError):
            J.parse_judgement(bad)


# --------------------------------------------------------------------------------------------------------------------
# the fake OpenAI-compatible server
# --------------------------------------------------------------------------------------------------------------------


def FakeServer() -> FakeOpenAI:
    """Replies by the predicted answer in the user message: 'FAIL500' -> 500 once then a verdict; 'GARBAGE' -> a
    malformed reply always; 'WRONG' -> no; anything else -> yes."""
    failed = set()
    lock = threading.Lock()

    def handler(req: FakeRequest) -> str | Reply:
        pred = req.user.split("Predicted answer:")[1].split("\n")[0].strip()
        with lock:
            first_failure = pred == "FAIL500" and pred not in failed
            failed.add(pred)
        if first_failure:
            return Reply(500, "oops")
        if pred == "GARBAGE":
            return "I cannot decide."
        if pred == "WRONG":
            return "{'pred': 'no', 'score': 1}"
        return "{'pred': 'yes', 'score': 4}"

    return FakeOpenAI(handler)


def test_openai_judge_retries_malformed_and_cache(tmp_path):
    with FakeServer() as srv:
        judge = J.OpenAIJudge(srv.url, "gpt-test", "sk-test", cache_dir=tmp_path / "cache", max_retries=2,
                              timeout=5, backoff=0.0)
        assert judge.judge("what?", "dog", "a dog") == {"pred": "yes", "score": 4}
        first = srv.requests[0]
        path, body, auth = first.path, first.body, first.headers.get("Authorization")
        assert path == "/v1/chat/completions" and body["temperature"] == 0 and body["model"] == "gpt-test"
        assert auth == "Bearer sk-test" and body["messages"][0]["role"] == "system"
        assert "Python dictionary" in body["messages"][1]["content"]
        assert srv.calls == 1

        assert judge.judge("what?", "dog", "FAIL500") == {"pred": "yes", "score": 4}  # 500, then success
        assert srv.calls == 3
        assert judge.judge("what?", "dog", "WRONG") == {"pred": "no", "score": 1}
        assert srv.calls == 4
        with pytest.raises(J.JudgeError, match="no verdict after 3"):
            judge.judge("what?", "dog", "GARBAGE")  # asked 1 + 2 retries, then an error
        assert srv.calls == 7

        # a rerun (fresh judge, same cache) makes no calls for the verdicts it already has
        again = J.OpenAIJudge(srv.url + "/v1", "gpt-test", cache_dir=tmp_path / "cache", backoff=0.0, max_retries=0)
        for pred in ["a dog", "FAIL500", "WRONG"]:
            again.judge("what?", "dog", pred)
        assert again.calls == 0 and srv.calls == 7
        # another judge model is another cache key
        other = J.OpenAIJudge(srv.url, "gpt-other", cache_dir=tmp_path / "cache", backoff=0.0)
        other.judge("what?", "dog", "a dog")
        assert other.calls == 1 and srv.calls == 8


def test_openai_judge_gives_up_on_connection_errors(tmp_path):
    with FakeServer() as srv:
        url = srv.url
    judge = J.OpenAIJudge(url, "m", cache_dir=tmp_path, max_retries=1, timeout=2, backoff=0.0)  # server is gone
    with pytest.raises(J.JudgeError, match="URLError|Connection"):
        judge.judge("q", "a", "p")


def test_model_judge_same_prompt_and_parsing():
    prompts = []

    def ask(prompt):
        prompts.append(prompt)
        return "{'pred': 'no', 'score': 0}" if "WRONG" in prompt else "Answer: {'pred': 'yes', 'score': 5}"

    judge = J.ModelJudge(ask)
    assert isinstance(judge, J.Judge)
    assert judge.judge("q", "a", "fine") == {"pred": "yes", "score": 5}
    assert judge.judge("q", "a", "WRONG") == {"pred": "no", "score": 0}
    assert J.SYSTEM_PROMPT in prompts[0] and "Predicted answer: fine" in prompts[0]
    with pytest.raises(J.JudgeError):
        J.ModelJudge(lambda p: "no idea").judge("q", "a", "p")


# --------------------------------------------------------------------------------------------------------------------
# data, converter, runner
# --------------------------------------------------------------------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_qa_validation(tmp_path):
    good = _write_jsonl(tmp_path / "ok.jsonl", [{"id": 1, "video": "v.mp4", "question": "q?", "answer": 3}])
    (item,) = qa.read_qa(good)
    assert item.id == "1" and item.answer == "3" and item.video == str(tmp_path / "v.mp4")
    for row, msg in [({"video": "v", "question": "", "answer": "a"}, "question"),
                     ({"question": "q", "answer": "a"}, "video"),
                     ({"video": "v", "question": "q", "answer": ""}, "answer"),
                     ({"video": "v", "question": "q", "answer": "a", "x": 1}, "unknown key")]:
        with pytest.raises(qa.QAError, match=msg):
            qa.read_qa(_write_jsonl(tmp_path / "bad.jsonl", [row]))


def test_from_msrvtt_qa(tmp_path):
    vids = tmp_path / "videos"
    vids.mkdir()
    (vids / "video7010.mp4").write_bytes(b"x")
    (vids / "clip.avi").write_bytes(b"x")
    src = tmp_path / "test_qa.json"
    src.write_text(json.dumps([
        {"answer": "sing", "id": 0, "question": "what is a man doing?", "video_id": 7010},
        {"answer": "dog", "question": "what animal?", "video": "clip"},
        {"answer": "x", "question": "missing video?", "video_id": 1},
        {"question": "no answer", "video_id": 7010},
    ]))
    out = tmp_path / "data" / "msrvtt_qa.jsonl"
    assert qa.from_msrvtt_qa(src, vids, out) == 2
    items = qa.read_qa(out)
    assert [i.id for i in items] == ["0", "1"] and items[0].answer == "sing"
    assert Path(items[0].video).resolve() == (vids / "video7010.mp4").resolve()
    assert Path(items[1].video).resolve() == (vids / "clip.avi").resolve()


def test_runner_end_to_end_with_stubbed_model(tmp_path, monkeypatch):
    import g4v_jax
    import g4v_jax.data.tokenizer

    data = _write_jsonl(tmp_path / "qa.jsonl", [
        {"id": "q1", "video": "a.mp4", "question": "what animal is shown?", "answer": "dog"},
        {"id": "q2", "video": "b.mp4", "question": "what is the man doing?", "answer": "sing"},
        {"id": "q3", "video": "c.mp4", "question": "what color is the car?", "answer": "red"},
        {"id": "q4", "video": "missing.mp4", "question": "what?", "answer": "x"},
    ])
    canned = {"q1": "Dog.", "q2": "The man is singing a song.", "q3": "WRONG"}
    seen = []

    def fake_answer_requests(model, tokenizer, requests, **kw):
        seen.append((requests, kw))
        return [{"id": r["id"], "answer": canned[r["id"]]} if r["id"] in canned
                else {"id": r["id"], "error": "cannot read video"} for r in requests]

    monkeypatch.setattr("g4v_jax.inference.answer_requests", fake_answer_requests)
    monkeypatch.setattr(g4v_jax, "load", lambda ckpt, overrides=(): object())
    monkeypatch.setattr(qa, "load_tokenizer", lambda path: object())

    # offline only
    qa.main(["--ckpt", str(tmp_path / "ckpt"), "--data", str(data), "--out", str(tmp_path / "off"),
             "--max-new-tokens", "16"])
    (reqs, kw), = seen
    assert reqs[0]["turns"] == [{"from": "human", "video": 0}, {"from": "human", "value": "what animal is shown?"}]
    assert reqs[0]["videos"] == [str(tmp_path / "a.mp4")] and kw["sampling"].max_new_tokens == 16
    rep = json.loads((tmp_path / "off" / "report.json").read_text())
    assert rep["samples"] == 4 and rep["data_sha256"] == qa.sha256_of(data) and rep["judge"] is None
    assert rep["metrics"]["offline"]["exact_match"] == pytest.approx(1 / 4)
    assert rep["metrics"]["offline"]["contains_match"] == pytest.approx(1 / 4)  # "singing" is not "sing"
    assert "judge" not in rep["metrics"] and set(rep["metric_definitions"]) == {"exact_match", "contains_match"}
    assert rep["model_errors"] == {"q4": "cannot read video"} and len(rep["records"]) == 4
    md = (tmp_path / "off" / "report.md").read_text()
    assert "Exact match (offline)" in md and "| 4 | 25.0 | 25.0 |" in md

    # with the judge: the fake server, cached under OUT/judge_cache; a rerun makes no calls
    with FakeServer() as srv:
        for _ in range(2):
            qa.main(["--ckpt", str(tmp_path / "ckpt"), "--data", str(data), "--out", str(tmp_path / "judged"),
                     "--judge-url", srv.url, "--judge-model", "gpt-test"])
        assert srv.calls == 3  # q1..q3 once; q4 (unanswered) never sent
    rep = json.loads((tmp_path / "judged" / "report.json").read_text())
    j = rep["metrics"]["judge"]
    assert j["yes"] == 2 and j["accuracy"] == pytest.approx(2 / 4) and j["score"] == pytest.approx(3.0)
    assert j["judge_errors"] == 0 and j["unanswered"] == 1 and rep["judge"]["http_calls"] == 0
    assert {r["id"]: r["judge"] for r in rep["records"]}["q3"] == {"pred": "no", "score": 1}
    assert "Judge accuracy" in (tmp_path / "judged" / "report.md").read_text()
