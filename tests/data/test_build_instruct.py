"""The instruction-data builder and the shared endpoint/request loop, against the fake OpenAI server: inputs,
lenient parsing and strict tag checks, retries (500, 429 + Retry-After, malformed bodies), the rate limiter,
rejections, and resuming after a limit, a dead server or a crash mid-write."""

import csv
import json
import re
import sys
import threading
from pathlib import Path

import pytest

from g4v_jax import endpoint as C
from g4v_jax.data.build import endpoint as E
from g4v_jax.data.build import instruct as I
from g4v_jax.data.manifest import read_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fake server
from fake_openai import FakeOpenAI, FakeRequest, Reply  # noqa: E402


# --------------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------------


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for vid, name in rows:
            w.writerow([vid, f"https://x/{vid}.mp4", "PT00H00M10S", "dir", name])
    return path


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_sample_captions_from_webvid_csv(tmp_path):
    rows = [(str(100 + i), f"caption number {i}") for i in range(20)] + [("200", "  "), ("", "no id")]
    rows.append(("201", "a caption,\n with a comma and a  newline"))
    path = _write_csv(tmp_path / "webvid.csv", rows)
    first, skipped = I.sample_captions(path, 5, seed=0)
    again, _ = I.sample_captions(path, 5, seed=0)
    other, _ = I.sample_captions(path, 5, seed=1)
    assert len(first) == 5 and first == again and first != other
    assert skipped == {"empty": 2}
    everything, _ = I.sample_captions(path, 1000, seed=0)
    assert len(everything) == 21 and I.Caption("201", "a caption, with a comma and a newline") in everything
    with pytest.raises(I.BuildError, match=r"no column\(s\) \['name'\]"):
        bad = tmp_path / "bad.csv"
        bad.write_text("videoid,caption\n1,x\n")
        I.sample_captions(bad, 3)


def test_reservoir_sample_is_uniform_enough():
    import random

    counts = [0] * 10
    rng = random.Random(0)
    for _ in range(4000):
        for x in I.reservoir_sample(iter(range(10)), 3, rng):
            counts[x] += 1
    assert all(abs(c - 1200) < 150 for c in counts), counts  # each item kept with probability 3/10


def test_read_groups(tmp_path):
    good = _write_jsonl(tmp_path / "groups.jsonl", [
        {"id": "g00001", "captions": [{"id": "1", "caption": "a cat"}, {"id": 2, "caption": "a  dog"}],
         "scores": [0.8]},
        {"id": "g00002", "captions": [{"id": "3", "caption": "x"}, {"id": "4", "caption": "y"},
                                      {"id": "5", "caption": "z"}]},
    ])
    groups = I.read_groups(good)
    assert [g.id for g in groups] == ["g00001", "g00002"]
    assert groups[0].captions == (I.Caption("1", "a cat"), I.Caption("2", "a dog")) and len(groups[1].captions) == 3
    for rows, msg in [
        ([{"id": "g1", "captions": [{"id": "1", "caption": "a"}]}], r"bad\.jsonl:1: \"captions\" must be a list of 2"),
        ([{"captions": [{"id": "1", "caption": "a"}, {"id": "2", "caption": "b"}]}], r":1: \"id\""),
        ([{"id": "g1", "captions": [{"id": "1", "caption": "a"}, {"id": "2", "caption": ""}]}], r":1: \"caption\""),
        ([{"id": "g1", "captions": [{"id": "1", "caption": "a"}, {"id": "2", "caption": "b"}]}] * 2,
         r":2: duplicate id"),
    ]:
        with pytest.raises(I.BuildError, match=msg):
            I.read_groups(_write_jsonl(tmp_path / "bad.jsonl", rows))


# --------------------------------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------------------------------

DIALOGUE = [{"speaker": "A", "text": "Look: <video> a cat </video>"}, {"speaker": "B", "text": "So cute!"}]


def test_extract_json_is_lenient():
    plain = json.dumps([DIALOGUE])
    assert I.reply_dialogues(plain) == [DIALOGUE]
    assert I.reply_dialogues(f"Sure! Here you go:\n```json\n{plain}\n```\nEnjoy.") == [DIALOGUE]
    assert I.reply_dialogues(f"Here they are: {plain} -- hope this helps [1]") == [DIALOGUE]
    assert I.reply_dialogues(json.dumps({"dialogues": [DIALOGUE]})) == [DIALOGUE]
    assert I.reply_dialogues(json.dumps(DIALOGUE)) == [DIALOGUE]  # one dialogue without the outer list
    for bad in ["I cannot do that.", "[]", "{\"a\": 1}", "[1, 2"]:
        with pytest.raises(I.DialogueError) as e:
            I.reply_dialogues(bad)
        assert e.value.reason == "no_json"


def test_dialogue_turns_maps_speakers():
    turns = I.dialogue_turns([{"Speaker": "Person A", "Text": " hi "}, {"speaker": "B", "content": "hello"},
                              {"speaker": "a", "text": "again"}, {"speaker": "a", "text": "and again"}])
    assert turns == [{"from": "human", "value": "hi"}, {"from": "ai", "value": "hello"},
                     {"from": "human", "value": "again"}, {"from": "human", "value": "and again"}]
    assert I.dialogue_turns(["Mia: hi there", "Leo: hey: what's up"]) == [
        {"from": "human", "value": "hi there"}, {"from": "ai", "value": "hey: what's up"}]
    for raw, reason in [([{"speaker": "A", "text": "x"}, {"speaker": "B", "text": "y"}, {"speaker": "C", "text": "z"}],
                         "too_many_speakers"),
                        ([{"speaker": "A", "text": "x"}, {"speaker": "A", "text": "y"}], "no_ai_turn"),
                        ([{"speaker": "A", "text": ""}, {"speaker": "B", "text": "y"}], "bad_line"),
                        ([{"speaker": "A"}, {"speaker": "B", "text": "y"}], "bad_line"),
                        (["no speaker here"], "bad_line"), ([], "bad_line"), ("text", "bad_line")]:
        with pytest.raises(I.DialogueError) as e:
            I.dialogue_turns(raw)
        assert e.value.reason == reason, raw


def test_video_spans_are_strict():
    assert I.video_spans("a <video> x </video> b <video>y</video>") == [(None, "x"), (None, "y")]
    assert I.video_spans("<video2> b </video2> then <video1>a</video1>") == [(2, "b"), (1, "a")]
    assert I.video_spans("no video here, <b>bold</b>") == []
    for bad in ["<video> x", "x </video>", "<video> </video>", "<video1> x </video2>", "<video> <video> x </video>",
                "<Video> x </Video>", "< video > x </video>", "<video01> x </video01>", "<video0> x </video0>",
                "<video1> x </video>"]:
        with pytest.raises(I.DialogueError) as e:
            I.video_spans(bad)
        assert e.value.reason == "malformed_tag", bad


def test_single_and_multi_checks():
    human, ai = "human", "ai"
    ok = [{"from": human, "value": "see <video> a cat </video>"}, {"from": ai, "value": "nice"}]
    assert I.check_single_video(ok) == ok
    for turns, reason in [([{"from": human, "value": "hi"}, {"from": ai, "value": "yo"}], "no_video"),
                          ([{"from": human, "value": "<video1> a </video1>"}, {"from": ai, "value": "b"}],
                           "unknown_video")]:
        with pytest.raises(I.DialogueError) as e:
            I.check_single_video(turns)
        assert e.value.reason == reason

    multi = [{"from": human, "value": "first <video3> c </video3>"}, {"from": ai, "value": "and <video1> a </video1>"},
             {"from": human, "value": "again <video3> c </video3>"}]
    assert [t["value"] for t in I.check_multi_video(multi, 3)] == [
        "first <video1> c </video1>", "and <video2> a </video2>", "again <video1> c </video1>"]
    for turns, reason in [([{"from": human, "value": "<video1> a </video1>"}], "too_few_videos"),
                          ([{"from": human, "value": "<video1> a </video1> <video4> d </video4>"}], "unknown_video"),
                          ([{"from": human, "value": "<video1> a </video1> <video> d </video>"}], "unknown_video")]:
        with pytest.raises(I.DialogueError) as e:
            I.check_multi_video(turns, 3)
        assert e.value.reason == reason


# --------------------------------------------------------------------------------------------------------------------
# endpoint
# --------------------------------------------------------------------------------------------------------------------


def test_rate_limiter_with_a_fake_clock():
    now = [100.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    limiter = C.RateLimiter(60, clock=lambda: now[0], sleep=sleep)  # one per second
    assert [limiter.acquire() for _ in range(3)] == [0.0, 1.0, 1.0]
    assert slept == [1.0, 1.0] and now[0] == 102.0
    now[0] += 10  # idle: the next request goes at once, no burst credit saved up
    assert limiter.acquire() == 0.0 and limiter.reserve() == 1.0

    # threads: every reservation gets its own slot (no two requests in the same slot)
    frozen = C.RateLimiter(120, clock=lambda: 0.0, sleep=lambda s: None)
    waits, lock = [], threading.Lock()

    def grab():
        for _ in range(25):
            w = frozen.reserve()
            with lock:
                waits.append(w)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(waits) == [0.5 * i for i in range(200)]
    with pytest.raises(ValueError, match="requests_per_minute"):
        C.RateLimiter(0)


def test_endpoint_url_key_and_rate_limit(monkeypatch):
    assert C.chat_completions_url("http://h:1/") == "http://h:1/v1/chat/completions"
    assert C.chat_completions_url("http://h:1/v1") == "http://h:1/v1/chat/completions"
    assert C.chat_completions_url("https://h/x/chat/completions") == "https://h/x/chat/completions"
    with pytest.raises(ValueError, match="http"):
        C.chat_completions_url("h:1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    slept, now = [], [0.0]
    with FakeOpenAI(lambda req: "ok") as srv:
        ep = C.ChatEndpoint(srv.url + "/v1", "m", requests_per_minute=30, clock=lambda: now[0],
                            sleep=slept.append)
        assert [ep.complete([{"role": "user", "content": "hi"}], temperature=0.3) for _ in range(3)] == ["ok"] * 3
    req = srv.requests[0]
    assert req.path == "/v1/chat/completions" and req.headers["Authorization"] == "Bearer sk-env"
    assert req.body == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.3}
    assert slept == [2.0, 4.0] and ep.calls == 3  # the clock is frozen: slots at 0, 2, 4 s


def test_endpoint_retries_and_rejections():
    script = {"n": 0}

    def handler(req: FakeRequest):
        kind = req.user
        script["n"] += 1
        if kind == "flaky500" and script["n"] == 1:
            return Reply(500, "boom")
        if kind == "rate" and script["n"] == 1:
            return Reply(429, "slow down", headers={"Retry-After": "7"})
        if kind == "rate-ms" and script["n"] == 1:
            return Reply(503, headers={"retry-after-ms": "250"})
        if kind == "badbody" and script["n"] <= 2:
            return Reply(raw=b"<html>gateway</html>") if script["n"] == 1 else Reply(content=None)
        if kind == "always500":
            return Reply(502)
        if kind == "bad":
            return Reply(400, "that prompt is not allowed")
        if kind == "key":
            return Reply(401, "invalid api key")
        return f"reply to {kind}"

    slept = []
    with FakeOpenAI(handler) as srv:
        ep = C.ChatEndpoint(srv.url, "m", "sk", max_retries=3, backoff=1.0, sleep=slept.append)

        def ask(kind):
            script["n"] = 0
            slept.clear()
            return ep.complete([{"role": "user", "content": kind}])

        assert ask("flaky500") == "reply to flaky500" and slept == [1.0]
        assert ask("rate") == "reply to rate" and slept == [7.0]  # Retry-After honoured
        assert ask("rate-ms") == "reply to rate-ms" and slept == [0.25]
        assert ask("badbody") == "reply to badbody" and slept == [1.0, 2.0]  # not JSON; null content
        with pytest.raises(C.EndpointUnavailable, match="after 4 attempt") as e:
            ask("always500")
        assert slept == [1.0, 2.0, 4.0] and e.value.attempts == 4 and "HTTP 502" in e.value.last
        calls = ep.calls
        with pytest.raises(C.EndpointRejected, match="HTTP 400.*that prompt is not allowed") as e:
            ask("bad")
        assert ep.calls == calls + 1 and slept == [] and e.value.status == 400 and not e.value.fatal
        with pytest.raises(C.EndpointRejected, match="invalid api key") as e:
            ask("key")
        assert e.value.fatal
        # a check that rejects the reply makes it retried like a malformed response
        script["n"] = 0
        seen = []

        def check(reply):
            seen.append(reply)
            if len(seen) < 2:
                raise ValueError("not yet")
            return len(reply)

        assert ep.complete_checked([{"role": "user", "content": "x"}], check) == ("reply to x", 10)
    dead = C.ChatEndpoint(srv.url, "m", max_retries=1, backoff=0.0, timeout=2)
    with pytest.raises(C.EndpointUnavailable, match="URLError|Connection"):
        dead.complete([{"role": "user", "content": "x"}])


def test_retry_after_forms():
    assert C.retry_after_seconds({"Retry-After": "3"}) == 3.0
    assert C.retry_after_seconds({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0) == 10.0
    assert C.retry_after_seconds({"Retry-After": "soon"}) is None and C.retry_after_seconds({}) is None
    assert C.retry_after_seconds({"Retry-After": "99999"}) == C.MAX_RETRY_AFTER
    assert C.retry_after_seconds({"Retry-After": "-5"}) == 0.0


# --------------------------------------------------------------------------------------------------------------------
# the builder against the fake server
# --------------------------------------------------------------------------------------------------------------------

_SINGLE = re.compile(r"<video> (.*?) </video>")
_MULTI = re.compile(r"<video(\d)> (.*?) </video\1>")


def single_reply(caption: str) -> str:
    v = f"<video> {caption} </video>"
    return json.dumps([
        [{"speaker": "A", "text": f"Look at this! {v}"}, {"speaker": "B", "text": "Wow, I love it."}],
        [{"speaker": "A", "text": "Can you find me something fun?"}, {"speaker": "B", "text": f"Sure: {v}"},
         {"speaker": "A", "text": "Ha, perfect."}],
        [{"speaker": "A", "text": "Guess what I saw today"}, {"speaker": "B", "text": f"Was it {v}?"}],
    ])


def builder_handler(req: FakeRequest) -> str | Reply:
    """Deterministic replies chosen by the caption: 'garbage' -> prose; 'badtag' -> one dialogue with an unclosed
    tag; 'novideo' -> one dialogue never shows the video; otherwise three good dialogues (in a code fence when the
    caption says 'fenced'). Multi prompts get one dialogue showing video 2 then video 1."""
    videos = _MULTI.findall(req.user)
    if videos:
        (n1, c1), (n2, c2) = videos[0], videos[1]
        return json.dumps([[{"speaker": "A", "text": f"Look <video{n2}> {c2} </video{n2}>"},
                            {"speaker": "B", "text": f"Mine is <video{n1}> {c1} </video{n1}>"},
                            {"speaker": "A", "text": "Both great."}]])
    caption = _SINGLE.search(req.user).group(1)
    if "garbage" in caption:
        return "Sorry, I am not able to write dialogues today."
    reply = single_reply(caption)
    if "badtag" in caption:
        reply = reply.replace(" </video>\"}, {\"speaker\": \"B\", \"text\": \"Wow", "\"}, {\"speaker\": \"B\", "
                              "\"text\": \"Wow", 1)
    if "novideo" in caption:
        reply = reply.replace(f"Was it <video> {caption} </video>?", "Was it a bird?")
    return f"Here you go:\n```json\n{reply}\n```" if "fenced" in caption else reply


CAPTIONS = [("11", "a cat plays the piano"), ("12", "fenced: surfers ride a wave"), ("13", "garbage caption"),
            ("14", "a badtag sunset"), ("15", "a novideo bird"), ("16", "a chef cuts onions")]
GROUPS = [{"id": "g00001", "captions": [{"id": "11", "caption": "a cat plays the piano"},
                                        {"id": "21", "caption": "a dog plays the drums"}], "scores": [0.7]},
          {"id": "g00002", "captions": [{"id": "16", "caption": "a chef cuts onions"},
                                        {"id": "22", "caption": "a cook fries eggs"},
                                        {"id": "23", "caption": "a baker kneads dough"}], "scores": [0.6, 0.5]}]


def _inputs(tmp_path):
    return (_write_csv(tmp_path / "webvid.csv", CAPTIONS), _write_jsonl(tmp_path / "groups.jsonl", GROUPS))


def _cli(srv, csv_path, groups_path, out, *extra):
    return I.main(["--url", srv.url, "--model", "gpt-test", "--out", str(out), "--captions", str(csv_path),
                   "--num-single", "100", "--groups", str(groups_path), "--no-progress", "--backoff", "0",
                   "--max-retries", "1", *extra])


def test_instruct_cli_single_and_multi(tmp_path, capsys):
    csv_path, groups_path = _inputs(tmp_path)
    out = tmp_path / "out" / "g4v50k.jsonl"
    with FakeOpenAI(builder_handler) as srv:
        assert _cli(srv, csv_path, groups_path, out, "--workers", "3", "--temperature", "0.9") == 0
    assert srv.calls == 8 and all(r.body["temperature"] == 0.9 and r.body["model"] == "gpt-test"
                                  for r in srv.requests)
    prompts = [r.user for r in srv.requests]
    assert any("<video> a cat plays the piano </video>" in p and "not a person and an AI assistant" in p
               for p in prompts)
    assert any("<video1> a chef cuts onions </video1>\n<video2> a cook fries eggs </video2>\n<video3> a baker"
               in p for p in prompts)

    examples = {ex.id: ex for ex in read_manifest(out)}
    # 11, 12, 16: 3 each; 13: none (no JSON); 14, 15: 2 each (one dialogue rejected); groups: 1 each
    assert sorted(examples) == sorted(
        [f"single-{v}-{k}" for v in ("11", "12", "16") for k in range(3)]
        + ["single-14-1", "single-14-2", "single-15-0", "single-15-1", "multi-g00001-0", "multi-g00002-0"])
    ex = examples["single-11-1"]
    assert [(t.role, t.text) for t in ex.turns] == [
        ("human", "Can you find me something fun?"), ("ai", "Sure: <video> a cat plays the piano </video>"),
        ("human", "Ha, perfect.")]
    assert ex.safety == "safe" and ex.videos == () and ex.captions == ()
    multi = examples["multi-g00002-0"]
    assert [t.text for t in multi.turns[:2]] == ["Look <video1> a cook fries eggs </video1>",
                                                 "Mine is <video2> a chef cuts onions </video2>"]  # renumbered

    report = capsys.readouterr().out
    assert "| requests planned | 8 |" in report and "| examples written in this run | 15 |" in report
    for line in ["| rejected: no_json | 1 |", "| rejected: malformed_tag | 1 |", "| rejected: no_video | 1 |",
                 "| HTTP calls | 8 |", "6 sampled caption(s)", "2 group(s)"]:
        assert line in report, line
    assert (out.parent / "g4v50k.jsonl.report.md").read_text() == report
    progress = [json.loads(line) for line in E.progress_path(out).read_text().splitlines()]
    assert len(progress) == 8
    garbage = next(p for p in progress if p["request"] == "single-13")
    assert garbage["examples"] == [] and garbage["rejected"] == {"no_json": 1} and "not able" in garbage["reply"]

    # a rerun with the same arguments makes no calls and changes nothing
    before = out.read_text()
    with FakeOpenAI(builder_handler) as srv2:
        assert _cli(srv2, csv_path, groups_path, out) == 0
    assert srv2.calls == 0 and out.read_text() == before
    assert "| finished before (skipped, no calls) | 8 |" in capsys.readouterr().out


def test_instruct_retries_500_and_429_within_a_run(tmp_path):
    csv_path, groups_path = _inputs(tmp_path)
    hits: dict[str, int] = {}
    lock = threading.Lock()

    def handler(req):
        key = req.user
        with lock:
            hits[key] = hits.get(key, 0) + 1
            n = hits[key]
        if "cat plays the piano </video>" in key and n == 1:
            return Reply(500, "overloaded")
        if "chef cuts onions </video>" in key and n == 1:
            return Reply(429, "rate limited", headers={"Retry-After": "0"})
        return builder_handler(req)

    out = tmp_path / "out.jsonl"
    with FakeOpenAI(handler) as srv:
        assert _cli(srv, csv_path, groups_path, out) == 0
    assert srv.calls == 10  # 8 requests + 2 retries
    ids = {ex.id for ex in read_manifest(out)}
    assert {"single-11-0", "single-16-2"} <= ids


def _uninterrupted(tmp_path) -> str:
    csv_path, groups_path = _inputs(tmp_path)
    out = tmp_path / "ref" / "out.jsonl"
    with FakeOpenAI(builder_handler) as srv:
        assert _cli(srv, csv_path, groups_path, out, "--workers", "1") == 0
    return out.read_text()


def test_resume_after_limit_makes_no_repeated_calls(tmp_path):
    reference = _uninterrupted(tmp_path)
    csv_path, groups_path = _inputs(tmp_path)
    out = tmp_path / "run" / "out.jsonl"
    seen = []
    with FakeOpenAI(builder_handler) as srv:
        assert _cli(srv, csv_path, groups_path, out, "--workers", "1", "--limit", "3") == 1
        assert srv.calls == 3
        assert _cli(srv, csv_path, groups_path, out, "--workers", "1") == 0
        seen = [r.user for r in srv.requests]
    assert len(seen) == 8 and len(set(seen)) == 8  # every request asked exactly once over the two runs
    assert out.read_text() == reference
    read_manifest(out)


def test_resume_after_the_server_dies(tmp_path):
    reference = _uninterrupted(tmp_path)
    csv_path, groups_path = _inputs(tmp_path)
    out = tmp_path / "run" / "out.jsonl"
    jobs = I.instruct_jobs(I.sample_captions(csv_path, 100)[0], I.read_groups(groups_path))
    with FakeOpenAI(builder_handler, die_after=2) as srv:  # answers two requests, then hangs up on everything
        ep = C.ChatEndpoint(srv.url, "gpt-test", max_retries=1, backoff=0.0, timeout=5)
        summary = E.run_requests(jobs, ep, out, workers=1, progress=False, max_consecutive_failures=3)
    assert summary.finished == 2 and summary.failed == 3 and summary.not_started == 3
    assert "endpoint seems down" in summary.stopped and summary.calls == 2 + 3 * 2
    answered = {r.user for r in srv.requests[:2]}
    with FakeOpenAI(builder_handler) as srv2:
        ep2 = C.ChatEndpoint(srv2.url, "gpt-test", max_retries=1, backoff=0.0, timeout=5)
        summary2 = E.run_requests(jobs, ep2, out, workers=1, progress=False)
    assert summary2.finished_before == 2 and summary2.finished == 6 and summary2.calls == 6
    assert not answered & {r.user for r in srv2.requests}  # nothing answered before is asked again
    assert out.read_text() == reference


def test_resume_repairs_a_crash_mid_write(tmp_path):
    csv_path, groups_path = _inputs(tmp_path)
    out = tmp_path / "out.jsonl"
    with FakeOpenAI(builder_handler) as srv:
        assert _cli(srv, csv_path, groups_path, out, "--workers", "1") == 0
    complete = out.read_text()
    progress = E.progress_path(out)
    lines = progress.read_text().splitlines()
    # crash 1: the last request's examples were written but not its progress line; crash 2: a cut-off line
    last = json.loads(lines[-1])
    progress.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20], encoding="utf-8")
    out.write_text(complete + '{"id": "single-99-0", "conv', encoding="utf-8")
    with FakeOpenAI(builder_handler) as srv:
        ep = C.ChatEndpoint(srv.url, "gpt-test", backoff=0.0)
        jobs = I.instruct_jobs(I.sample_captions(csv_path, 100)[0], I.read_groups(groups_path))
        summary = E.run_requests(jobs, ep, out, workers=1, progress=False)
    assert summary.calls == 1 and summary.finished == 1 and summary.finished_before == 7
    assert summary.dropped_on_repair == len(last["examples"]) + 1 and srv.requests[0].user == jobs[-1].messages[-1][
        "content"]
    assert sorted(out.read_text().splitlines()) == sorted(complete.splitlines())
    assert len(progress.read_text().splitlines()) == 8
    read_manifest(out)


def test_rejections_and_a_bad_key(tmp_path, capsys):
    csv_path, groups_path = _inputs(tmp_path)
    out = tmp_path / "out.jsonl"

    def moderated(req):
        return Reply(400, "flagged by moderation") if "garbage" in req.user else builder_handler(req)

    with FakeOpenAI(moderated) as srv:
        assert _cli(srv, csv_path, groups_path, out) == 0
    assert "| rejected: http_400 | 1 |" in capsys.readouterr().out
    rec = next(json.loads(x) for x in E.progress_path(out).read_text().splitlines() if "single-13" in x)
    assert rec["rejected"] == {"http_400": 1} and "flagged by moderation" in rec["error"]

    with FakeOpenAI(lambda req: Reply(401, "invalid api key")) as srv:
        assert _cli(srv, csv_path, groups_path, tmp_path / "other.jsonl", "--workers", "1") == 2
    assert srv.calls == 1 and "invalid api key" in capsys.readouterr().err


def test_run_requests_validates_examples_and_ids(tmp_path):
    def parse_bad(reply):
        return E.Parsed([{"id": "x-0", "conversation": []}, {"id": "x-1", "conversation": [
            {"from": "human", "value": "q"}, {"from": "ai", "value": reply}]}], {"odd": 1})

    jobs = [E.Job("x", [{"role": "user", "content": "hi"}], parse_bad),
            E.Job("y", [{"role": "user", "content": "hi"}], lambda reply: 1 / 0)]
    with FakeOpenAI(lambda req: "fine") as srv:
        ep = C.ChatEndpoint(srv.url, "m", backoff=0.0)
        summary = E.run_requests(jobs, ep, tmp_path / "o.jsonl", progress=False)
        with pytest.raises(ValueError, match="unique"):
            E.run_requests(jobs + jobs[:1], ep, tmp_path / "o2.jsonl", progress=False)
    assert summary.rejected == {"invalid_example": 1, "odd": 1, "parser_crash": 1} and summary.examples_written == 1
    assert [ex.id for ex in read_manifest(tmp_path / "o.jsonl")] == ["x-1"]
