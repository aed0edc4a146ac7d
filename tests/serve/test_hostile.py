"""The server against a hostile client: every row of the serving-hardening issue's table (a 40 KB stop string that
once OOM-killed the server, top_k = 2**31 that once stopped the engine for good, NUL bytes, JSON nested 100,000 deep,
lone surrogates, a megabyte of text, a decompression-bomb video, a trickled body, cross-origin text/plain, unknown
models, penalties), the API key with the official ``openai`` client, CORS, the access log, a failing engine, video
retention, a drain on SIGTERM, a plain LLM with its chat template, and Schemathesis fuzzing the OpenAPI
description."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest

from g4v_jax.config import Config, EngineConfig, load_config
from g4v_jax.data.video import write_video
from g4v_jax.models.gpt4video import build_model
from g4v_jax.serve.server import Server, ServeConfig
from g4v_jax.serve.jobs import VideoJobs
from g4v_jax.serve.media import MediaLimits

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripted_engine import ScriptedPrograms, script_engine  # noqa: E402
from test_server import Running, _data_url, _get, _http, _server, _with_video, world  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[2]
HELLO = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def hostile(world, tmp_path_factory):
    """The usual test server, but it decodes at most 64 x 64 pixels a frame (so a small file plays the bomb)."""
    tmp = tmp_path_factory.mktemp("hostile")
    write_video(tmp / "big.mp4", np.zeros((4, 96, 96, 3), np.uint8))
    server = _server(world, tmp)
    server.cfg = dataclasses.replace(server.cfg, limits=MediaLimits(max_frame_pixels=64 * 64))
    running = Running(server)
    running.big = tmp / "big.mp4"
    yield running
    running.stop()


def _post(running, body, content_type="application/json", **headers) -> object:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _http("POST", running.url + "/v1/chat/completions", data, {"content-type": content_type, **headers})


def _nested(depth: int) -> bytes:
    return b'{"model": "tiny", "messages": [{"role": "user", "content": ' + b"[" * depth + b"]" * depth + b"}]}"


HOSTILE = [
    ("a 40 KB stop string", lambda r: {**HELLO, "stop": ["x" * 40000]}, 400, "stop[0] must be 1 to 256 characters"),
    ("five stop strings", lambda r: {**HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "list of 1 to 4 strings"),
    ("top_k 2**31", lambda r: {**HELLO, "top_k": 2**31, "temperature": 1.0}, 200, None),
    ("top_k -5", lambda r: {**HELLO, "top_k": -5}, 400, "'top_k' must be an integer >= -1"),
    ("seed 2**70", lambda r: {**HELLO, "seed": 2**70}, 400, "'seed' must be an integer in"),
    ("an integer of 5000 digits", lambda r: ('{"model": "tiny", "max_tokens": ' + "9" * 5000 + ', "messages": []}'
                                             ).encode(), 400, "not JSON"),
    ("NaN temperature", lambda r: b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     "'temperature' must be a number in [0.0, 2.0]"),
    ("a NUL byte in a file URL", lambda r: _with_video("file://a.mp4\u0000.mp4"), 400, "NUL character"),
    ("a percent-encoded NUL", lambda r: _with_video("file://a.mp4%00.mp4"), 400, "NUL character"),
    ("JSON arrays nested 100,000 deep", lambda r: b"[" * 100_000 + b"]" * 100_000, 400, "nests JSON too deeply"),
    ("an object nested 100,000 deep in content", lambda r: _nested(100_000), 400, "nests JSON too deeply"),
    ("content nested 50 deep", lambda r: _nested(50), 400, "messages[0].content[0]: unsupported content part type"),
    ("a lone surrogate", lambda r: b'{"messages": [{"role": "user", "content": "a \\ud800 b"}]}', 400,
     "messages[0].content holds a lone surrogate"),
    ("a lone surrogate in a stop", lambda r: b'{"messages": [{"role": "user", "content": "a"}], "stop": "\\udfff"}',
     400, "stop[0] holds a lone surrogate"),
    ("1 MB of text", lambda r: {**HELLO, "messages": [{"role": "user", "content": "red " * 250_000}]}, 400,
     "more than the model's context can hold"),
    ("600 messages", lambda r: {**HELLO, "messages": [{"role": "user", "content": "x"}] * 600}, 400,
     "600 messages; this server takes at most 512"),
    ("100 content parts", lambda r: {**HELLO, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}] * 100}]}, 400, "has 100 parts; this server takes at most 64"),
    ("a 96x96 video over a 64x64 pixel budget", lambda r: _with_video(_data_url(r.big)), 400,
     "declares 4 frames of 96x96; this server decodes at most 4,096 pixels a frame"),
    ("a JSON body sent as text/plain (a cross-origin 'simple' request)", lambda r: HELLO, 415,
     "Content-Type: application/json, got 'text/plain'"),
    ("presence_penalty 2", lambda r: {**HELLO, "presence_penalty": 2}, 400, "'presence_penalty' is not supported"),
    ("frequency_penalty 0 (neutral)", lambda r: {**HELLO, "frequency_penalty": 0, "presence_penalty": 0.0}, 200, None),
    ("logit_bias", lambda r: {**HELLO, "logit_bias": {"5": 100}}, 400, "'logit_bias' is not supported"),
    ("logprobs true", lambda r: {**HELLO, "logprobs": True}, 400, "'logprobs' is not supported"),
    ("n 2", lambda r: {**HELLO, "n": 2}, 400, "'n' must be 1"),
    ("a model the server does not serve", lambda r: {**HELLO, "model": "gpt-4"}, 404,
     "the model 'gpt-4' does not exist; this server serves 'tiny'"),
    ("stream as a string", lambda r: {**HELLO, "stream": "yes"}, 400, "'stream' must be true or false"),
    ("a role of its own", lambda r: {**HELLO, "messages": [{"role": "tool", "content": "x"}]}, 400,
     "must be an object with role system, user or assistant, got 'tool'"),
    ("a text part without text", lambda r: {**HELLO, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     400, "messages[0].content[0].text must be a string"),
    ("unknown stream_options", lambda r: {**HELLO, "stream_options": {"x": 1}}, 400, "'stream_options' must be"),
]


@pytest.mark.parametrize("name,body,status,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_request_gets_a_clear_answer_and_the_server_goes_on(hostile, name, body, status, message):
    content_type = "text/plain" if "text/plain" in name else "application/json"
    r = _post(hostile, body(hostile), content_type)
    assert r.status_code == status, r.text[:500]
    assert "Traceback" not in r.text
    if message is not None:
        err = r.json()["error"]
        assert message in err["message"], err
        assert set(err) == {"message", "type", "param", "code"} and len(err["message"]) < 400
    ok = _post(hostile, HELLO)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
    assert _get(hostile.url + "/health").json()["status"] == "ok"


def test_a_body_that_never_finishes_gets_408_and_frees_the_connection(world, tmp_path):
    server = _server(world, tmp_path)
    server.cfg = dataclasses.replace(server.cfg, body_timeout_s=0.5)
    running = Running(server)
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=60) as s:
            # 100 bytes promised, 10 sent, never the rest: the server gives up after body_timeout_s
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"model\": ")
            got = b""
            while b"\r\n\r\n" not in got:
                piece = s.recv(4096)
                assert piece, "the server closed without an answer"
                got += piece
        assert got.startswith(b"HTTP/1.1 408"), got[:200]
        assert _post(running, HELLO).status_code == 200
    finally:
        running.stop()


def test_the_api_key_with_the_official_client_raw_http_and_open_health(world, tmp_path):
    server = _server(world, tmp_path)
    server.cfg = dataclasses.replace(server.cfg, api_key="s3cret-key")
    running = Running(server)
    try:
        def client(key):
            return openai.OpenAI(base_url=running.url + "/v1", api_key=key, max_retries=0, timeout=60)

        messages = [{"role": "user", "content": "hello"}]
        out = client("s3cret-key").chat.completions.create(model="tiny", messages=messages, max_tokens=3)
        assert out.choices[0].message.role == "assistant"
        assert [m.id for m in client("s3cret-key").models.list().data] == ["tiny"]
        for key in ("wrong", "s3cret-key-and-more", "s3cret-ke"):
            with pytest.raises(openai.AuthenticationError) as e:
                client(key).chat.completions.create(model="tiny", messages=messages, max_tokens=3)
            assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        for headers in ({}, {"authorization": "s3cret-key"}, {"authorization": "Basic s3cret-key"}):
            r = _http("GET", running.url + "/v1/models", None, headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert _post(running, HELLO, **headers).status_code == 401
        assert _get(running.url + "/v1/videos/video-0").status_code == 401  # job ids are not a key
        assert _get(running.url + "/health").status_code == 200  # open: a load balancer's probe has no key
        assert _get(running.url + "/").status_code == 200  # the page asks for the key itself
    finally:
        running.stop()


def test_a_server_open_to_the_network_without_a_key_warns_at_start_up():
    from g4v_jax.serve.__main__ import exposure_warning

    assert "without an API key" in exposure_warning("0.0.0.0", "")
    assert exposure_warning("0.0.0.0", "k") is None
    assert exposure_warning("127.0.0.1", "") is None and exposure_warning("localhost", "") is None
    assert exposure_warning("::1", "") is None and "without" in exposure_warning("192.168.1.5", "")


def test_cors_only_for_the_origins_named(world, tmp_path, hostile):
    preflight = {"origin": "http://evil.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "content-type"}
    r = _http("OPTIONS", hostile.url + "/v1/chat/completions", None, preflight)
    assert "access-control-allow-origin" not in r.headers  # the browser refuses to send the JSON POST
    r = _post(hostile, HELLO, origin="http://evil.example")
    assert "access-control-allow-origin" not in r.headers
    server = _server(world, tmp_path)
    server.cfg = dataclasses.replace(server.cfg, allowed_origins=("http://ok.example",),
                                         api_key="k")
    running = Running(server)
    try:
        ok = _http("OPTIONS", running.url + "/v1/chat/completions", None,
                   {**preflight, "origin": "http://ok.example", "access-control-request-headers":
                    "authorization,content-type"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://ok.example"
        bad = _http("OPTIONS", running.url + "/v1/chat/completions", None, preflight)
        assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
        r = _post(running, HELLO, origin="http://ok.example", authorization="Bearer k")
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ok.example"
    finally:
        running.stop()


def test_one_log_line_per_request_and_no_traceback_for_a_client_error(hostile, caplog):
    with caplog.at_level(logging.INFO, logger="g4v_jax"):
        assert _post(hostile, HELLO).status_code == 200
        assert _post(hostile, {**HELLO, "top_k": -5}).status_code == 400
        assert _post(hostile, b"{not json").status_code == 400
        deadline = time.time() + 30
        while len([r for r in caplog.records if r.name == "g4v_jax.serve.access"]) < 3 and time.time() < deadline:
            time.sleep(0.02)
    lines = [r for r in caplog.records if r.name == "g4v_jax.serve.access"]
    assert len(lines) == 3, [r.getMessage() for r in lines]
    first, second, third = (r.getMessage() for r in lines)
    assert "POST /v1/chat/completions status=200 tokens=" in first and "seconds=" in first
    assert "status=400" in second and "status=400" in third and first.startswith("req-")
    assert all(r.exc_info is None and r.levelno < logging.WARNING for r in caplog.records)


def test_a_request_the_engine_fails_is_a_500_and_the_others_go_on(world, tmp_path, monkeypatch):
    script_engine(monkeypatch, world["tokenizer"].encode(" fine", add_special_tokens=False)
                  + [world["tokenizer"].eos_token_id])
    running = Running(_server(world, tmp_path))
    try:
        programs = running.server.engine.programs
        real = programs.extend
        hello = len(running.server.engine_request(_call(HELLO["messages"]), []).prompt_ids)

        def poisoned(state, ds, ids, rows, flat, start, n, *rest):
            if int(start) + int(n) > hello + 20:  # the long request's prefill fails, as a bug would
                raise OverflowError("Python int too large to convert to C int")
            return real(state, ds, ids, rows, flat, start, n, *rest)

        programs.extend = poisoned
        long_one = {**HELLO, "messages": [{"role": "user", "content": "red " * 60}]}
        r = _post(running, long_one)
        assert r.status_code == 500 and r.json()["error"]["message"].startswith("internal error: the engine failed")
        chunks = _post(running, {**long_one, "stream": True}).text
        assert "internal error: the engine failed" in chunks and chunks.rstrip().endswith("data: [DONE]")
        ok = _post(running, {**HELLO, "max_tokens": 8})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "fine"
        assert _get(running.url + "/health").json()["status"] == "ok"
    finally:
        running.stop()


def test_at_most_max_concurrent_decodes_videos_are_decoded_at_once(world, tmp_path, monkeypatch):
    from g4v_jax.serve import server as server_module

    server = _server(world, tmp_path)  # max_concurrent_decodes = 2
    inside, release = [], threading.Event()

    def decode(url, where, **kwargs):
        inside.append(url)
        release.wait(60)
        return None, False

    monkeypatch.setattr(server_module, "load_video_part", decode)
    threads = [threading.Thread(target=server.load_video, args=(f"v{i}", "x")) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while len(inside) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert len(inside) == 2 and not server._decoding.acquire(blocking=False)  # the third waits for a turn
    release.set()
    for t in threads:
        t.join(timeout=30)
    assert len(inside) == 3
    server.stop()


def test_generated_videos_are_deleted_by_count_and_age(tmp_path):
    from g4v_jax.t2v.base import RenderedVideo
    from g4v_jax.tags import VideoRequest

    now = [1000.0]
    made = []

    def render(requests, stem):
        path = tmp_path / f"{stem}_1.mp4"
        path.write_bytes(b"mp4")
        path.with_suffix(".gif").write_bytes(b"gif")
        made.append(path)
        return [RenderedVideo(requests[0], path=path, error=None)]

    jobs = VideoJobs(render, keep_files=2, max_age_s=60, clock=lambda: now[0])
    ids = []
    for i in range(3):
        job = jobs.submit(VideoRequest(f"clip {i}", None, 0, 1, True))
        jobs._pool.submit(lambda: None).result()  # the single worker ran this job before
        now[0] += 1
        ids.append(job.id)
    jobs.prune()
    assert jobs.get(ids[0]) is None and not made[0].exists() and not made[0].with_suffix(".gif").exists()
    assert all(jobs.get(i).status == "succeeded" and p.exists() for i, p in zip(ids[1:], made[1:]))
    now[0] += 61
    jobs.prune()
    assert jobs.get(ids[1]) is None and jobs.get(ids[2]) is None and not any(p.exists() for p in made)
    jobs.close()


def test_sigterm_drains_running_requests_then_stops(world, tmp_path, monkeypatch):
    """uvicorn's SIGTERM handler (what ``python -m g4v_jax.serve`` runs under) with a stream in flight: the stream
    is answered to its end, new connections are refused, then the engine thread and the job worker stop."""
    release = threading.Event()
    ids = world["tokenizer"].encode(" one two three four five six", add_special_tokens=False)
    script_engine(monkeypatch, ids + [world["tokenizer"].eos_token_id])
    real_step = ScriptedPrograms.step

    def gated(self, state, ds, active):
        release.wait(60)  # the answer cannot end before the test has sent the signal
        return real_step(self, state, ds, active)

    monkeypatch.setattr(ScriptedPrograms, "step", gated)
    running = Running(_server(world, tmp_path))
    body = json.dumps({**HELLO, "max_tokens": 32, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", running.port), timeout=60)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while b"data:" not in got:
        got += s.recv(4096)
    running.uv.handle_exit(signal.SIGTERM, None)
    deadline = time.time() + 30
    while running.uv.servers and any(srv.is_serving() for srv in running.uv.servers) and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", running.port), timeout=5).close()
    release.set()
    while b"[DONE]" not in got:
        piece = s.recv(4096)
        assert piece, got
        got += piece
    s.close()
    text = "".join(json.loads(line[5:])["choices"][0]["delta"].get("content", "")
                   for line in got.decode().splitlines() if line.startswith("data: {") and '"choices": [{' in line)
    assert text == "one two three four five six"
    running.thread.join(timeout=30)
    assert not running.thread.is_alive() and running.server._thread is None


def test_the_command_line_exits_0_on_sigterm(world, tmp_path):
    from g4v_jax.weights import save_pretrained

    ckpt = tmp_path / "ckpt"
    save_pretrained(world["model"], Config(model=world["model"].cfg), ckpt)
    world["tokenizer"].save_pretrained(str(ckpt))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "g4v_jax.serve", "--ckpt", str(ckpt), "--port", str(port),
                             "--no-warmup", "--slots", "2", "--max-length", "256", "--output-dir", str(tmp_path / "o")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            try:
                if _get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except OSError:
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err and err.rstrip().endswith("stopped"), err


def test_a_plain_llm_is_served_with_its_chat_template(tmp_path):
    """A ``kind: llm`` model whose tokenizer has a chat template gets the template's prompt (as vLLM serves it), not
    the paper's ``###Human:`` format; a GPT4Video keeps the paper's."""
    from g4v_jax.data.tokenizer import build_bpe_tokenizer

    cfg = load_config("tiny").model
    llm = build_model(_llm_config(cfg))
    tok = build_bpe_tokenizer(["<|im_start|>user hello<|im_end|> <|im_start|>assistant hi there"] * 4,
                              tmp_path / "tok", vocab_size=cfg.llm.vocab_size)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    server = Server(llm, tok, ServeConfig(model_name="llm", output_dir=str(tmp_path / "o"), max_tokens=4,
                                          engine=EngineConfig(num_slots=2, max_length=256, min_bucket=64)))
    running = Running(server)
    try:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
        out = running.client.chat.completions.create(model="llm", messages=messages, max_tokens=3)
        want = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)
        assert out.usage.prompt_tokens == len(want)
        assert server.engine_request(_call(messages), []).prompt_ids.tolist() == want
    finally:
        running.stop()


def _llm_config(cfg):
    return dataclasses.replace(cfg, kind="llm")


def _call(messages):
    from g4v_jax.serve import api

    return api.parse_chat({"messages": messages, "max_tokens": 3}, max_videos=0)


# --------------------------------------------------------------------------------------------------------------------
# Schemathesis over /openapi.json
# --------------------------------------------------------------------------------------------------------------------


def _fuzz(running, mode: str, examples: int) -> list[str]:
    """Requests Schemathesis generates from the server's own OpenAPI description (``mode`` positive: valid by the
    schema; negative: each breaks it somewhere); returns what went wrong (a 5xx, a slow answer, a non-JSON error)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(running.url + "/openapi.json")
    problems: list[str] = []
    ops = [("/v1/chat/completions", "POST"), ("/v1/video/frames", "POST")]
    if mode == "positive":  # a path parameter of any string has no negative example
        ops.append(("/v1/videos/{job_id}", "GET"))
    for path, method in ops:
        op = schema[path][method]

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(GenerationMode(mode)))
        def run(case):
            t0 = time.time()
            r = case.call(base_url=running.url, timeout=60)
            took = time.time() - t0
            if r.status_code >= 500 or took > 30 or (r.status_code >= 400 and "error" not in r.json()):
                problems.append(f"{method} {path} {r.status_code} {took:.1f}s {case.body!r:.300}: {r.text[:300]}")

        run()
        assert _post(running, HELLO).status_code == 200  # and the server still answers
    return problems


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_5xx_and_no_slow_answer(hostile, mode):
    assert _fuzz(hostile, mode, 60) == []
