"""The OpenAI-compatible server on 127.0.0.1, driven by the official ``openai`` client and by raw HTTP: chat with
videos (streamed and not), multi-turn, video generation jobs, refusals, 16 concurrent clients, a table of bad
inputs after which the server still answers, a client that disconnects mid-stream, health, models and metrics."""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from g4v_jax.config import EngineConfig, load_config
from g4v_jax.data.template import SYSTEM_PROMPT
from g4v_jax.data.tokenizer import build_bpe_tokenizer
from g4v_jax.data.video import load_video, synthetic_frames, write_video
from g4v_jax.inference.session import make_renderer
from g4v_jax.models.gpt4video import build_model
from g4v_jax.safety.gates import keyword_prompt_check
from g4v_jax.safety.refusal import POLITE_REFUSAL
from g4v_jax.serve.app import create_app
from g4v_jax.serve.server import ServeConfig, Server
from g4v_jax.serve.media import MediaLimits

import openai  # noqa: E402  (the official client; a dev dependency)
import uvicorn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared scripted engine
from scripted_engine import script_engine  # noqa: E402

CORPUS = [SYSTEM_PROMPT, "###Human: <video></video> ###Human: What happens in this video? ###AI: a red square "
          "moves to the right. <video>a red square on a gradient</video> ###Human: And then? ###AI: stops."] * 8


class Running:
    """A uvicorn server on a free loopback port, in a thread of the test process."""

    def __init__(self, server: Server) -> None:
        self.server = server
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uv.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=30)


class Response:
    def __init__(self, status: int, headers: dict, content: bytes) -> None:
        self.status_code, self.headers, self.content = status, headers, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> Response:
    """A plain HTTP request (the stdlib's client: no retries, no redirects, nothing hidden)."""
    import http.client
    import urllib.parse

    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=body, headers=headers or {})
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def _get(url: str) -> Response:
    return _http("GET", url)


def _data_url(path: Path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def _gate(path: str) -> bool:
    """Stands in for the learned input detector: a mostly white video is 'hazardous'."""
    clip = load_video(path, num_frames=4, size=32)
    return float(clip.frames.mean()) > 200


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cfg = load_config("tiny").model
    model = build_model(cfg)
    tokenizer = build_bpe_tokenizer(CORPUS, root / "tok", vocab_size=cfg.llm.vocab_size)
    media = root / "media"
    media.mkdir()
    write_video(media / "a.mp4", synthetic_frames(12, 48, 64, seed=1))
    write_video(media / "b.mp4", synthetic_frames(10, 40, 56, seed=2))
    write_video(media / "white.mp4", np.full((8, 48, 48, 3), 250, np.uint8))
    write_video(root / "outside.mp4", synthetic_frames(8, 32, 32, seed=3))
    (media / "text.mp4").write_text("this is a text file, not a video")
    full = (media / "a.mp4").read_bytes()
    (media / "truncated.mp4").write_bytes(full[: len(full) // 3])
    write_video(media / "long.mp4", np.zeros((10_000, 16, 16, 3), np.uint8), fps=100)
    os.mkfifo(media / "fifo.mp4")
    return dict(root=root, model=model, tokenizer=tokenizer, media=media)


def _server(world, tmp: Path, **kw) -> Server:
    renderer = make_renderer("solid", tmp / "videos", check_prompt=keyword_prompt_check(["sex"]))
    cfg = ServeConfig(model_name="tiny", media_dir=str(world["media"]), output_dir=str(tmp), max_body_bytes=4 * 2**20,
                      max_videos=4, max_tokens=12, limits=MediaLimits(max_video_frames=3000, decode_timeout_s=20),
                      engine=EngineConfig(num_slots=4, max_length=512, max_queue=64, min_bucket=64), **kw)
    return Server(world["model"], world["tokenizer"], cfg, renderer=renderer, video_gate=_gate)


@pytest.fixture(scope="module")
def served(world, tmp_path_factory):
    running = Running(_server(world, tmp_path_factory.mktemp("out")))
    yield running
    running.stop()


def _video_message(url: str, text: str = "What happens in this video?") -> dict:
    return {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": text}]}


def test_chat_with_a_video_streamed_and_not(served, world):
    messages = [_video_message(_data_url(world["media"] / "a.mp4"))]
    whole = served.client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    text = whole.choices[0].message.content
    assert isinstance(text, str) and whole.usage.completion_tokens >= 1
    assert whole.usage.prompt_tokens > 20  # the video's slots count
    pieces, usage, finish = [], None, None
    for chunk in served.client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                       stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text
    assert usage.completion_tokens == whole.usage.completion_tokens and finish == whole.choices[0].finish_reason
    # the same video as a file:// URL inside the media directory: the same answer
    by_path = served.client.chat.completions.create(
        model="tiny", messages=[_video_message(f"file://{world['media'] / 'a.mp4'}")], max_tokens=10, temperature=0)
    assert by_path.choices[0].message.content == text


def test_multi_turn_and_two_videos(served, world):
    messages = [_video_message(_data_url(world["media"] / "a.mp4")),
                {"role": "assistant", "content": "a red square moves."},
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "file://b.mp4"}},
                                             {"type": "text", "text": "And this one?"}]}]
    out = served.client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert out.usage.prompt_tokens > 2 * world["model"].cfg.num_video_tokens
    assert out.choices[0].finish_reason in ("stop", "length")


def test_sixteen_concurrent_clients_get_the_answers_they_get_alone(served, world):
    def ask(i: int) -> str:
        content = [{"type": "text", "text": f"question number {i} about " + "red " * (i % 5)}]
        if i % 3 == 0:
            content.insert(0, {"type": "video_url", "video_url": {"url": f"file://{'a' if i % 2 else 'b'}.mp4"}})
        out = served.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                                    max_tokens=4 + i % 7, temperature=0)
        return out.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    alone = [ask(i) for i in range(16)]
    assert together == alone


def test_models_health_and_metrics(served):
    assert [m.id for m in served.client.models.list().data] == ["tiny"]
    assert _get(served.url + "/health").json()["status"] == "ok"
    text = _get(served.url + "/metrics").text
    for name in ("g4v_requests_total", "g4v_time_to_first_token_seconds_bucket", "g4v_request_latency_seconds_count",
                 "g4v_queue_depth", "g4v_slots_busy", "g4v_generation_tokens_total"):
        assert name in text, name


def test_the_media_picker_lists_the_top_level_videos_and_no_hidden_file(served, world):
    hidden = world["media"] / ".a.4242.17.tmp.mp4"  # a writer's temporary file, halfway (data.video.write_video)
    hidden.write_bytes((world["media"] / "a.mp4").read_bytes()[:100])
    try:
        listed = _get(served.url + "/v1/media").json()["videos"]
    finally:
        hidden.unlink()
    # by name: text.mp4 and truncated.mp4 are refused when asked for; the fifo is not a file
    assert listed == ["a.mp4", "b.mp4", "long.mp4", "text.mp4", "truncated.mp4", "white.mp4"]


def _metric(url: str, name: str) -> float:
    for line in _get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_conversation_resent_each_turn_decodes_and_encodes_its_video_once(world, tmp_path):
    """Three turns over one video, the whole conversation resent each turn (as OpenAI clients and the page do): the
    video is decoded once (clip cache), encoded once (video token cache), and turns 2-3 prefill only what is new."""
    running = Running(_server(world, tmp_path))
    try:
        messages = [_video_message(_data_url(world["media"] / "a.mp4"))]
        for question in ("And then?", "What colour is it?", "done"):
            out = running.client.chat.completions.create(model="tiny", messages=messages, max_tokens=5)
            messages += [{"role": "assistant", "content": out.choices[0].message.content or "ok"},
                         {"role": "user", "content": question}]
        url = running.url
        assert _metric(url, "g4v_decoded_video_cache_hits_total") == 2
        assert _metric(url, "g4v_encoded_videos_total") == 1
        hit, computed = _metric(url, "g4v_prefix_cache_hit_tokens_total"), _metric(url, "g4v_prefill_tokens_total")
        assert hit > computed  # turns 2 and 3 reuse the system prompt, the video and the earlier turns
    finally:
        running.stop()


def test_a_flagged_video_gets_the_polite_refusal(served, world):
    out = served.client.chat.completions.create(
        model="tiny", messages=[_video_message(_data_url(world["media"] / "white.mp4"))], max_tokens=8)
    assert out.choices[0].message.content == POLITE_REFUSAL


def test_generation_jobs_render_refuse_and_never_touch_the_text(world, tmp_path, monkeypatch):
    answer = " Sure: <video>a red square on a gradient</video> and <video>a couple having sex</video>###"
    script_engine(monkeypatch, world["tokenizer"].encode(answer, add_special_tokens=False)
                  + [world["tokenizer"].eos_token_id])
    running = Running(_server(world, tmp_path))
    try:
        out = running.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Make me two videos"}], max_tokens=64)
        text = out.choices[0].message.content
        assert text == answer.replace("###", "").strip()
        jobs = out.choices[0].message.model_extra["video_generations"]
        assert [j["prompt"] for j in jobs] == ["a red square on a gradient", "a couple having sex"]
        final = {}
        deadline = time.time() + 60
        while len(final) < 2 and time.time() < deadline:
            for j in jobs:
                status = _get(f"{running.url}/v1/videos/{j['id']}").json()
                if status["status"] not in ("queued", "running"):
                    final[j["id"]] = status
            time.sleep(0.1)
        ok, refused = final[jobs[0]["id"]], final[jobs[1]["id"]]
        assert ok["status"] == "succeeded" and ok["progress"] == 1.0
        mp4 = _get(running.url + ok["url"])
        assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
        (tmp_path / "got.mp4").write_bytes(mp4.content)
        assert load_video(tmp_path / "got.mp4", num_frames=4, size=32).frames.shape == (4, 32, 32, 3)
        assert refused["status"] == "refused" and "refused:" in refused["error"]["message"]
        gone = _get(f"{running.url}/v1/videos/{jobs[1]['id']}/content")
        assert gone.status_code == 404 and "refused" in gone.json()["error"]["message"]
        # streamed: the job list arrives with the last chunk
        chunks = list(running.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Again"}], max_tokens=64, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        last = [c for c in chunks if c.choices][-1].choices[0].delta.model_extra["video_generations"]
        assert len(last) == 2
    finally:
        running.stop()


def _post(served, body: bytes | dict, **headers) -> Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _http("POST", served.url + "/v1/chat/completions", data, {"content-type": "application/json", **headers})


def _with_video(url: str, **extra) -> dict:
    return {"model": "tiny", "messages": [_video_message(url)], "max_tokens": 4, **extra}


BAD_INPUTS = [
    ("bad base64", lambda w: _with_video("data:video/mp4;base64,@@@not base64@@@"), 400, "not valid base64"),
    ("a text file as a video", lambda w: _with_video(_data_url(w["media"] / "text.mp4")), 400,
     "not a readable video"),
    ("a truncated mp4", lambda w: _with_video(_data_url(w["media"] / "truncated.mp4")), 400, "not a readable video"),
    ("zero bytes", lambda w: _with_video("data:video/mp4;base64,"), 400, "empty (0 bytes)"),
    ("a 10,000-frame video", lambda w: _with_video("file://long.mp4"), 400, "has 10000 frames"),
    ("a body over the limit", lambda w: b"{" + b" " * (5 * 2**20) + b"}", 413, "over the limit"),
    ("a path outside the media dir", lambda w: _with_video(f"file://{w['root'] / 'outside.mp4'}"), 400,
     "outside the media directory"),
    ("..", lambda w: _with_video("file://../outside.mp4"), 400, "outside the media directory"),
    ("a FIFO", lambda w: _with_video("file://fifo.mp4"), 400, "is a FIFO"),
    ("a remote URL", lambda w: _with_video("https://example.com/v.mp4"), 400, "does not fetch remote URLs"),
    ("an unknown content-part type", lambda w: {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, 400,
     "unsupported content part type 'input_audio'"),
    ("too many videos", lambda w: {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "file://a.mp4"}}] * 5 + [{"type": "text", "text": "?"}]}]}, 400,
     "5 videos in one request; this server takes at most 4"),
    ("negative max_tokens", lambda w: {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": -3}, 400, "'max_tokens' must be an integer >= 1"),
    ("a prompt beyond the context", lambda w: {"model": "tiny", "messages": [{"role": "user",
                                                                              "content": "red " * 700}]}, 400,
     "it does not fit the 512 tokens this server gives a request"),
    ("not JSON", lambda w: b"{this is not json", 400, "not JSON"),
    ("no user message last", lambda w: {"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, 400,
     "the last message must be a user message"),
    ("temperature out of range", lambda w: {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                            "temperature": 9}, 400, "'temperature' must be a number in [0.0, 2.0]"),
]


@pytest.mark.parametrize("name,body,status,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_clear_error_and_the_server_goes_on(served, world, name, body, status, message):
    t0 = time.time()
    r = _post(served, body(world))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and "Traceback" not in r.text
    assert set(err) == {"message", "type", "param", "code"}
    assert time.time() - t0 < 60
    ok = _post(served, {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    engine = served.server.engine
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "tell me a long story"}],
                       "max_tokens": 400, "stream": True, "stop": ["never-appears"]})
    with socket.create_connection(("127.0.0.1", served.port)) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        got = b""
        while got.count(b"data:") < 3:
            got += s.recv(4096)
        assert engine.free_slots() < engine.cfg.num_slots
    deadline = time.time() + 30
    while engine.free_slots() < engine.cfg.num_slots and time.time() < deadline:
        time.sleep(0.05)
    assert engine.free_slots() == engine.cfg.num_slots
    assert 'g4v_requests_total{outcome="disconnected"}' in _get(served.url + "/metrics").text


def _disconnected(served) -> float:
    for line in _get(served.url + "/metrics").text.splitlines():
        if line.startswith('g4v_requests_total{outcome="disconnected"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_client_that_gives_up_on_a_plain_request_frees_its_slot(world, tmp_path, monkeypatch):
    # a scripted model at 200 ms a token: 300 tokens take a minute, so a slot freed before the deadline with the
    # reason "cancelled" was freed by the disconnect, however slow the machine (no wall-clock bound on the cancel)
    script_engine(monkeypatch, world["tokenizer"].encode(" la", add_special_tokens=False), step_seconds=0.2)
    running = Running(_server(world, tmp_path))
    try:
        engine = running.server.engine
        reasons = []
        deliver = engine._deliver

        def recorded(handle, active, reason, **kw):
            reasons.append(reason)
            return deliver(handle, active, reason, **kw)

        monkeypatch.setattr(engine, "_deliver", recorded)
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "a long answer please"}],
                           "max_tokens": 300})
        s = socket.create_connection(("127.0.0.1", running.port))
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        deadline = time.time() + 50
        while engine.free_slots() == engine.cfg.num_slots and time.time() < deadline:
            time.sleep(0.01)
        assert engine.free_slots() < engine.cfg.num_slots
        s.close()
        while not reasons and time.time() < deadline:
            time.sleep(0.02)
        assert reasons == ["cancelled"]
        assert engine.free_slots() == engine.cfg.num_slots
        while _disconnected(running) < 1 and time.time() < deadline:  # counted after the cancel, by the handler
            time.sleep(0.02)
        assert _disconnected(running) == 1
    finally:
        running.stop()


def test_a_diffusers_model_named_on_the_command_line_renders_the_jobs(world, tmp_path, monkeypatch):
    """``--t2v diffusers --t2v-path DIR`` with options and settings: a tiny LTX-Video pipeline renders the job, and
    the job says what the model's rules changed (12 frames asked, 8k+1 = 9 rendered)."""
    pytest.importorskip("diffusers")
    import av

    from g4v_jax.serve.__main__ import _safety_and_t2v, parse_args
    from g4v_jax.t2v.tiny import build_tiny_pipeline

    pipeline = build_tiny_pipeline("ltx", tmp_path / "ltx")
    args = parse_args(["--ckpt", str(tmp_path), "--t2v", "diffusers", "--t2v-path", str(pipeline), "--output-dir",
                       str(tmp_path / "out"), "--t2v-option", "device=cpu", "--t2v-option", "prompt_prefix=a film: ",
                       "--t2v-setting", "num_frames=12", "--t2v-setting", "height=32", "--t2v-setting", "width=64",
                       "--t2v-setting", "steps=2"])
    _, renderer = _safety_and_t2v(args)
    answer = " Here: <video>a red square on a gradient</video>###"
    script_engine(monkeypatch, world["tokenizer"].encode(answer, add_special_tokens=False)
                  + [world["tokenizer"].eos_token_id])
    cfg = ServeConfig(model_name="tiny", media_dir=str(world["media"]), output_dir=str(tmp_path / "out"),
                      max_tokens=32, engine=EngineConfig(num_slots=2, max_length=512, max_queue=8, min_bucket=64))
    running = Running(Server(world["model"], world["tokenizer"], cfg, renderer=renderer))
    try:
        out = running.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Make me a video"}], max_tokens=32)
        (job,) = out.choices[0].message.model_extra["video_generations"]
        deadline = time.time() + 60
        while job["status"] in ("queued", "running") and time.time() < deadline:
            time.sleep(0.1)
            job = _get(f"{running.url}/v1/videos/{job['id']}").json()
        assert job["status"] == "succeeded", job
        assert job["model_prompt"] == "a film: a red square on a gradient"
        assert any("num_frames 12 -> 9" in n for n in job["notes"])
        (tmp_path / "got.mp4").write_bytes(_get(running.url + job["url"]).content)
        with av.open(str(tmp_path / "got.mp4")) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            assert container.streams.video[0].average_rate == 24  # LTX-Video's frame rate
        assert len(frames) == 9 and frames[0].shape == (32, 64, 3)
    finally:
        running.stop()
    bad = parse_args(["--ckpt", str(tmp_path), "--t2v", "diffusers", "--t2v-path", str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="--t2v diffusers: .*nope.*no such"):
        _safety_and_t2v(bad)


def test_the_command_line_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "g4v_jax.serve", "--ckpt", str(tmp_path / "nothing")],
                       capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"python -m g4v_jax.serve: error: --ckpt {tmp_path / 'nothing'}: not a "
                                             "g4v_jax model directory (no config.yaml)"]
