"""The chat front end: ChatSession history and streaming, answer post-processing (stop string, <video> tags),
batch answering (order, per-request errors, batch invariance) and the CLI (batch, interactive, errors).

Random weights give gibberish, so these tests check mechanics; the fixed-text cases replace the engine by a fake that
"generates" a given text.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from g4v_jax import chat, inference
from g4v_jax.config import Config, load_config
from g4v_jax.data.template import SYSTEM_PROMPT, Turn, render
from g4v_jax.data.tokenizer import build_bpe_tokenizer
from g4v_jax.data.video import VideoReadError, synthetic_frames, write_video
from g4v_jax.inference.generate import SamplingConfig
from g4v_jax.models.gpt4video import build_model
from g4v_jax.weights import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the shared scripted engine
from scripted_engine import script_engine  # noqa: E402
CORPUS = [SYSTEM_PROMPT, "###Human: <video></video> ###Human: What happens in this video? ###AI: a red square "
          "moves to the right. <video>a red square on a gradient</video> café ###Human: And then? ###AI: stops."] * 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random GPT4Video saved with its tokenizer as one checkpoint directory, and two videos."""
    root = tmp_path_factory.mktemp("chat")
    cfg = load_config("tiny").model
    model = build_model(cfg)
    ckpt = root / "ckpt"
    tokenizer = build_bpe_tokenizer(CORPUS, root / "tok", vocab_size=cfg.llm.vocab_size)
    save_pretrained(model, Config(model=cfg), ckpt)
    tokenizer.save_pretrained(str(ckpt))
    videos = root / "videos"
    videos.mkdir()
    write_video(videos / "a.mp4", synthetic_frames(12, 48, 64, seed=1))
    write_video(videos / "b.mp4", synthetic_frames(10, 40, 56, seed=2))
    (videos / "broken.mp4").write_bytes(b"this is not a video")
    return dict(root=root, cfg=cfg, model=model, tokenizer=tokenizer, ckpt=ckpt, videos=videos)


def _fake_engine(monkeypatch, tokenizer, text: str):
    """Make the engine "generate" the tokens of ``text`` (then EOS) for every request."""
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    script_engine(monkeypatch, ids)


# --------------------------------------------------------------------------------------------------------------------
# ChatSession
# --------------------------------------------------------------------------------------------------------------------


def _conversation(world):
    session = inference.ChatSession(world["model"], world["tokenizer"], SamplingConfig(max_new_tokens=12))
    assert session.attach_video(world["videos"] / "a.mp4") == 0
    pieces = []
    first = session.ask("What happens in this video?", on_token=pieces.append)
    first_prompt = session.last_prompt_ids
    second = session.ask("And then?")
    return session, first, second, first_prompt, pieces


def test_session_history_streaming_and_determinism(world):
    session, first, second, first_prompt, pieces = _conversation(world)
    assert [(t.role, t.video) for t in session.turns] == [
        ("human", 0), ("human", None), ("ai", None), ("human", None), ("ai", None)]
    assert session.turns[2].text == first.text and session.turns[4].text == second.text
    assert first.text and "".join(pieces) == first.text
    assert 1 <= first.num_tokens <= 12
    # the conversation is carried over: the second prompt extends the first (video slots included)
    assert len(session.last_prompt_ids) > len(first_prompt)
    assert session.last_prompt_ids[: len(first_prompt)].tolist() == first_prompt.tolist()
    assert (first_prompt == -1).sum() == world["cfg"].num_video_tokens
    # greedy: a second session gives the same answers
    _, first_again, second_again, _, _ = _conversation(world)
    assert (first_again.text, second_again.text) == (first.text, second.text)

    session.reset()
    assert session.turns == [] and session.clips == [] and session.pending == []


def test_session_cache_grows_with_the_conversation_and_answers_as_a_full_context_cache(world):
    """The session's cache starts at 512 positions and is rebuilt larger only when a prompt outgrows it; the answers
    are those of a session whose cache holds the whole context from the start."""
    from g4v_jax.inference.engine import Engine, EngineConfig

    cfg = load_config("tiny", ["model.llm.max_position_embeddings=2048"]).model
    model = build_model(cfg)
    long_question = "What happens in this video? " * 100
    answers = {}
    for cache in ("grows", "whole context"):
        session = inference.ChatSession(model, world["tokenizer"], SamplingConfig(max_new_tokens=8))
        if cache == "whole context":
            session._engine_obj = Engine(model, world["tokenizer"], EngineConfig(num_slots=1, max_length=2048))
        lengths, texts = [], []
        for question in ("What happens in this video?", long_question, "And then?"):
            texts.append(session.ask(question).text)
            lengths.append(session._engine_obj.cfg.max_length)
        answers[cache] = texts
        if cache == "grows":
            assert lengths[0] == 512 and lengths[1] == lengths[2] > 512, lengths
            assert len(session.last_prompt_ids) + 8 <= lengths[2]
    assert answers["grows"] == answers["whole context"]


def test_session_errors(world, tmp_path):
    session = inference.ChatSession(world["model"], world["tokenizer"], SamplingConfig(max_new_tokens=8))
    with pytest.raises(VideoReadError, match="broken.mp4"):
        session.attach_video(world["videos"] / "broken.mp4")
    assert session.clips == [] and session.pending == []
    with pytest.raises(ValueError, match="context of 512"):
        session.ask("hello " * 600)
    assert session.turns == []  # a failed question leaves the history alone


def test_session_tags_and_stop_string_with_a_fake_engine(world, monkeypatch):
    text = " Here: <video>a red square</video> then café ##x ###Human: more"
    _fake_engine(monkeypatch, world["tokenizer"], text)
    session = inference.ChatSession(world["model"], world["tokenizer"], SamplingConfig(max_new_tokens=64))
    session.attach_video(world["videos"] / "a.mp4")
    pieces = []
    answer = session.ask("Show me", on_token=pieces.append)
    assert answer.text == "Here: <video>a red square</video> then café ##x"
    assert "".join(pieces) == answer.text and not any("\ufffd" in p for p in pieces)
    assert [(r.prompt, r.index) for r in answer.requests] == [("a red square", None)]
    assert answer.text[answer.requests[0].start:answer.requests[0].end] == "<video>a red square</video>"
    assert session.turns[-1].text == answer.text  # tags stay in the history, as in training data
    # the next prompt holds the answer as a finished AI turn
    _, conv, _ = session.prompt("Next")
    shown = world["tokenizer"].decode([i for i in conv.input_ids if i >= 0], skip_special_tokens=True)
    assert shown == render(session.turns + [Turn("human", "Next")], add_generation_prompt=True, video_text="")


def test_finish_answer_and_stream_decoder(world):
    a = inference.finish_answer(" two clips <video1>a cat</video1> and <video2> a dog </video2>###", 9)
    assert a.text == "two clips <video1>a cat</video1> and <video2> a dog </video2>" and a.num_tokens == 9
    assert [(r.prompt, r.index) for r in a.requests] == [("a cat", 1), ("a dog", 2)]
    assert inference.finish_answer("  ", 1).text == ""
    tok = world["tokenizer"]
    dec = inference.StreamDecoder(tok)
    pieces = [dec.push(t) for t in tok.encode(" naïve ✓ done #", add_special_tokens=False)] + [dec.finish()]
    assert "".join(pieces) == "naïve ✓ done #" and not any("\ufffd" in p for p in pieces)


# --------------------------------------------------------------------------------------------------------------------
# Batch answering
# --------------------------------------------------------------------------------------------------------------------


def _requests(world):
    v = world["videos"]
    return [
        {"id": "vid", "videos": [str(v / "a.mp4")],
         "turns": [{"from": "human", "video": 0}, {"from": "human", "value": "What happens in this video?"}]},
        {"id": "text", "turns": [{"from": "human", "value": "Hi"}, {"from": "ai", "value": "Hello, how can I help?"},
                                 {"from": "human", "value": "Tell me a long story about a red square and its day."}]},
        {"id": "bad", "videos": [str(v / "broken.mp4")],
         "turns": [{"from": "human", "video": 0}, {"from": "human", "value": "What?"}]},
    ]


def test_answer_requests_order_errors_and_batch_invariance(world):
    reqs = _requests(world)
    cfg = SamplingConfig(max_new_tokens=8)
    together = inference.answer_requests(world["model"], world["tokenizer"], reqs, sampling=cfg, progress=False)
    assert [r["id"] for r in together] == ["vid", "text", "bad"]
    assert set(together[2]) == {"id", "error"} and "broken.mp4" in together[2]["error"]
    for r in together[:2]:
        assert set(r) == {"id", "answer", "video_requests", "num_tokens"} and 1 <= r["num_tokens"] <= 8
    # left padding (and a padding video for the text row) does not change greedy answers
    for i in range(2):
        alone = inference.answer_requests(world["model"], world["tokenizer"], [reqs[i]], sampling=cfg, progress=False)
        assert alone == [together[i]], reqs[i]["id"]


def test_answer_requests_tags_settings_and_bad_requests(world, monkeypatch):
    _fake_engine(monkeypatch, world["tokenizer"], " Sure. <video>a red square</video>###")
    reqs = [{"id": 1, "turns": [{"from": "human", "value": "Make a video"}], "temperature": 0.7, "seed": 3},
            {"turns": [{"from": "ai", "value": "no question"}]},
            {"id": "few", "turns": [{"from": "human", "value": "Short"}], "max_new_tokens": 3},
            {"id": "long", "turns": [{"from": "human", "value": "x " * 600}]},
            {"id": "zero", "turns": [{"from": "human", "value": "Short"}], "max_new_tokens": 0}]
    out = inference.answer_requests(world["model"], world["tokenizer"], reqs, sampling=SamplingConfig(max_new_tokens=32),
                               progress=False)
    # the engine ends the answer at the "###" in its text (the EOS after it is never generated)
    n_fake = len(world["tokenizer"].encode(" Sure. <video>a red square</video>###"))
    assert out[0] == {"id": 1, "answer": "Sure. <video>a red square</video>",
                      "video_requests": [{"prompt": "a red square", "index": None, "start": 6, "end": 33}],
                      "num_tokens": n_fake}
    assert out[1]["id"] == 1 and "last turn must be a human" in out[1]["error"]  # id defaults to the position
    assert out[2]["num_tokens"] == 3 and out[2]["answer"] == inference.clean_answer(
        world["tokenizer"].decode(world["tokenizer"].encode(" Sure. <video>a red square</video>")[:3]))
    assert "context of 512" in out[3]["error"]
    assert "max_new_tokens" in out[4]["error"]  # the rest of the batch is still answered


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def _start_cli(args, stdin: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    with open(stdin or os.devnull) as f:
        return subprocess.Popen([sys.executable, "-m", "g4v_jax.chat", *map(str, args)], env=env, cwd=ROOT, text=True,
                                stdin=f, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def cli_runs(world, tmp_path_factory):
    """Both CLI runs (batch, interactive), started together (each is mostly start-up and compiling) and waited for
    by the tests: {name: (returncode, stdout, stderr, workdir)}."""
    work = tmp_path_factory.mktemp("cli")
    (work / "clip.mp4").write_bytes((world["videos"] / "b.mp4").read_bytes())
    lines = [{"id": "q1", "videos": ["clip.mp4"],  # relative to the requests file
              "turns": [{"from": "human", "video": 0}, {"from": "human", "value": "What happens?"}]},
             {"turns": [{"from": "human", "value": "Hello"}]},
             {"id": "q3", "videos": ["missing.mp4"],
              "turns": [{"from": "human", "video": 0}, {"from": "human", "value": "What happens?"}]}]
    (work / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    v = world["videos"]
    (work / "stdin.txt").write_text(f"/video {v / 'a.mp4'}\nWhat happens?\n/video {v / 'broken.mp4'}\n/quit\n")
    procs = {
        "batch": _start_cli(["--ckpt", world["ckpt"], "--input", work / "in.jsonl", "--output", work / "out.jsonl",
                             "--max-new-tokens", 8]),
        "interactive": _start_cli(["--ckpt", world["ckpt"], "--max-new-tokens", 6], stdin=work / "stdin.txt"),
    }
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            results[name] = (proc.returncode, out, err, work)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def test_cli_batch_mode(cli_runs):
    rc, _, stderr, work = cli_runs["batch"]
    assert rc == 0, stderr[-3000:]
    out = [json.loads(x) for x in (work / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == ["q1", 2, "q3"]  # a missing id is the line number
    assert "answer" in out[0] and "answer" in out[1] and out[0]["num_tokens"] <= 8
    assert "missing.mp4" in out[2]["error"]
    assert "wrote 3 answers" in stderr and "1 failed" in stderr


def test_cli_interactive(cli_runs):
    rc, stdout, stderr, _ = cli_runs["interactive"]
    assert rc == 0, stderr[-3000:]
    assert "(video 1 attached" in stdout
    assert f"\n{chat.ANSWER_MARKER} " in stdout
    assert "error:" in stdout and "broken.mp4" in stdout  # a bad video does not end the session
    assert "tokens in" in stderr


def test_cli_errors(world, tmp_path, capsys):
    assert chat.main(["--ckpt", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--ckpt" in err and "no such directory" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"turns": [{"from": "human", "value": "ok"}]}\n{"turns": [oops]}\n')
    assert chat.main(["--ckpt", str(world["ckpt"]), "--input", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: not valid JSON" in err and len(err.strip().splitlines()) == 1
    bad.write_text('{"turns": [{"from": "human", "value": "ok"}]}\n\n{"videos": ["a.mp4"], "turns": '
                   '[{"from": "human", "value": "no video turn"}]}\n')
    # a request that is JSON but wrong fails alone; the rest of the file is answered (README)
    assert chat.main(["--ckpt", str(world["ckpt"]), "--input", str(bad), "--output", str(tmp_path / "o")]) == 0
    answers = [json.loads(line) for line in (tmp_path / "o").read_text().splitlines()]
    assert "answer" in answers[0] and answers[1]["id"] == 3
    assert "the video turns must be numbered" in answers[1]["error"]
    capsys.readouterr()
    assert chat.main(["--ckpt", str(world["ckpt"]), "--tokenizer", str(tmp_path), "--input", str(bad)]) == 2
    assert "both --input and --output" in capsys.readouterr().err


def test_flagged_input_video_gets_the_polite_refusal(world):
    from g4v_jax.safety.refusal import POLITE_REFUSAL

    session = inference.ChatSession(world["model"], world["tokenizer"], SamplingConfig(max_new_tokens=4),
                               video_gate=lambda path: path.endswith("a.mp4"))
    assert session.attach_video(world["videos"] / "a.mp4") == -1  # flagged: not attached
    pieces = []
    answer = session.ask("What happens?", on_token=pieces.append)
    assert answer.text == POLITE_REFUSAL and "".join(pieces) == POLITE_REFUSAL
    assert session.clips == [] and session.turns[-1].text == POLITE_REFUSAL
    assert session.attach_video(world["videos"] / "b.mp4") == 0  # a safe video afterwards is attached as usual


def test_answer_to_files_through_a_backend(world, monkeypatch, tmp_path):
    """Chat answer -> <video> requests -> prompt check -> backend -> files, paths attached to the answer."""
    from g4v_jax.safety.gates import keyword_prompt_check

    _fake_engine(monkeypatch, world["tokenizer"], " Here: <video>a red square</video> and <video>gore</video>###")
    renderer = inference.make_renderer("solid", tmp_path / "videos", check_prompt=keyword_prompt_check(["gore"]))
    session = inference.ChatSession(world["model"], world["tokenizer"], SamplingConfig(max_new_tokens=32),
                               renderer=renderer)
    answer = session.ask("Make two videos")
    assert [r.prompt for r in answer.requests] == ["a red square", "gore"]
    first, second = answer.videos
    assert first.path is not None and first.path.is_file() and first.error is None
    assert second.path is None and "refused" in second.error  # the prompt gate stopped it
    assert answer.text.startswith("Here:")  # the text answer is intact


def test_one_answer_rendered_by_two_text_to_video_models(world, monkeypatch, tmp_path):
    """The paper's "no retraining" claim: one answer with two <video> requests, rendered by a tiny Wan and a tiny
    ZeroScope pipeline chosen on the command line (name, path, options, settings); the LLM and its answer are the
    same object throughout and neither backend sees anything but the prompts."""
    pytest.importorskip("diffusers")
    import numpy as np

    from g4v_jax.data.video import load_video
    from g4v_jax.t2v.tiny import build_tiny_pipeline

    _fake_engine(monkeypatch, world["tokenizer"],
                 " Sure. <video>a red square</video> then <video>a red square on a gradient</video>###")
    session = inference.ChatSession(world["model"], world["tokenizer"], SamplingConfig(max_new_tokens=40))
    answer = session.ask("Make two videos")
    assert [r.prompt for r in answer.requests] == ["a red square", "a red square on a gradient"]

    flags = {"wan": ["--t2v-setting", "num_frames=6", "--t2v-setting", "height=16", "--t2v-setting", "width=32",
                     "--t2v-setting", "steps=2", "--t2v-option", "prompt_suffix=, at night"],
             "zeroscope": ["--t2v-setting", "num_frames=3", "--t2v-setting", "height=32", "--t2v-setting", "width=32",
                           "--t2v-setting", "steps=2", "--t2v-option", "scheduler=dpm"]}
    shapes = {"wan": (5, 16, 32), "zeroscope": (3, 32, 32)}  # Wan's 4k+1 rule moved 6 frames to 5
    results = {}
    for family, extra in flags.items():
        path = build_tiny_pipeline(family, tmp_path / family)
        args = chat.parse_args(["--ckpt", str(world["ckpt"]), "--t2v", "diffusers", "--t2v-path", str(path),
                                "--t2v-out", str(tmp_path / "out" / family), "--t2v-option", "device=cpu", *extra])
        _, renderer = chat._safety_and_t2v(args)
        results[family] = renderer(answer.requests, "turn1")
    for family, rendered in results.items():
        assert [r.error for r in rendered] == [None, None], rendered
        assert [r.request for r in rendered] == list(answer.requests)
        assert [r.path.name for r in rendered] == ["turn1_1.mp4", "turn1_2.mp4"]
        for r in rendered:
            f, h, w = shapes[family]
            clip = load_video(r.path, num_frames=f, size=max(h, w), pad="repeat_last")
            assert clip.frame_mask.sum() == f
    assert results["wan"][0].sent_prompt == "a red square, at night"
    assert any("num_frames 6 -> 5" in n for n in results["wan"][0].notes)
    assert results["zeroscope"][0].sent_prompt == "a red square" and results["zeroscope"][0].notes == ()
    a = load_video(results["wan"][0].path, num_frames=5, size=32).frames
    b = load_video(results["zeroscope"][0].path, num_frames=5, size=32, pad="repeat_last").frames
    assert not np.array_equal(a, b)  # two models, two videos of one request

    bad = chat.parse_args(["--ckpt", str(world["ckpt"]), "--t2v", "diffusers"])
    with pytest.raises(chat.CLIError, match="--t2v-path"):
        chat._safety_and_t2v(bad)
    bad = chat.parse_args(["--ckpt", str(world["ckpt"]), "--t2v", "diffusers", "--t2v-path", str(path),
                           "--t2v-option", "turbo=true"])
    with pytest.raises(chat.CLIError, match="turbo"):
        chat._safety_and_t2v(bad)
    bad = chat.parse_args(["--ckpt", str(world["ckpt"]), "--t2v", "solid", "--t2v-setting", "frames=3"])
    with pytest.raises(chat.CLIError, match="unknown text-to-video setting"):
        chat._safety_and_t2v(bad)


# --------------------------------------------------------------------------------------------------------------------
# untrusted batches: a FIFO as a video, an interrupted run keeps what it finished
# --------------------------------------------------------------------------------------------------------------------


def test_a_fifo_video_fails_its_request_only_and_never_hangs_the_batch(world, tmp_path):
    import threading

    fifo = tmp_path / "stream.mp4"
    os.mkfifo(fifo)
    reqs = [{"id": "fifo", "videos": [str(fifo)],
             "turns": [{"from": "human", "video": 0}, {"from": "human", "value": "What happens?"}]},
            {"id": "ok", "turns": [{"from": "human", "value": "Hello"}]},
            {"id": "zero", "turns": [{"from": "human", "value": "Hello"}], "max_new_tokens": 0}]
    seen, out = [], {}
    thread = threading.Thread(target=lambda: out.update(results=inference.answer_requests(
        world["model"], world["tokenizer"], reqs, sampling=SamplingConfig(max_new_tokens=4), progress=False,
        on_result=seen.append)), daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the batch hung on a FIFO"
    fifo_result, ok, zero = out["results"]
    assert fifo_result == {"id": "fifo", "error": f"{str(fifo)!r} is a FIFO: a video must be a regular file (or a "
                                                  "folder of images)"}
    assert "answer" in ok and "max_new_tokens" in zero["error"]
    assert sorted(r["id"] for r in seen) == ["fifo", "ok", "zero"]  # each handed out as soon as it was final


# The CLI as `python -m g4v_jax.chat` runs it, but the process sends itself SIGINT right after its first answer is
# written: the signal lands mid-batch on any machine, however loaded (no race between the test and the batch).
_INTERRUPT_AFTER_FIRST_ANSWER = """
import os, signal, sys
from g4v_jax import chat
from g4v_jax.inference import batch
answer_requests = batch.answer_requests
def interrupted(*args, on_result, **kwargs):
    def once(result):
        on_result(result)
        if not getattr(once, "sent", False):
            once.sent = True
            os.kill(os.getpid(), signal.SIGINT)
    return answer_requests(*args, on_result=once, **kwargs)
batch.answer_requests = interrupted
sys.exit(chat.main(sys.argv[1:]))
"""


def test_an_interrupted_batch_keeps_every_finished_answer(world, tmp_path):
    n = 12
    lines = [{"id": f"q{i}", "turns": [{"from": "human", "value": "What happens? " * (1 + i % 7)}],
              "max_new_tokens": 8} for i in range(n)]
    requests = tmp_path / "in.jsonl"
    requests.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    output = tmp_path / "out.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _INTERRUPT_AFTER_FIRST_ANSWER, "--ckpt", str(world["ckpt"]),
                           "--input", str(requests), "--output", str(output), "--batch-size", "1"],
                          env=env, cwd=ROOT, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    kept = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(kept) == 1 and kept[0]["id"] == "q0" and "answer" in kept[0]
    assert f"g4v_jax.chat: error: interrupted: 1 of {n} answers are in {output}" in proc.stderr
