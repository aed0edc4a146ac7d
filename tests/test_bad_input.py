"""The bad-input table: each row runs a real command's ``main`` on a bad input and checks what the user sees.

Every row must end in exit status 2 (raised or returned by ``main``) with exactly one line on stderr,
``<prog>: error: <message>``, where the message matches the row's pattern (it names the field, file or tensor), and
no traceback. Rows are grouped by area; each
area's builder makes its inputs under ``tmp_path`` and returns ``(main, argv)``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest


def _main(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "main")


# (id, builder(tmp_path) -> (main "module:function", argv), message pattern)
Case = tuple[str, Callable[[Path], tuple[str, list[str]]], str]

# ---- training configs (train.py / config.py / sharding.py) ----------------------------------------------------------
def _train(*overrides: str) -> Callable[[Path], tuple[str, list[str]]]:
    return lambda tmp: ("g4v_jax.train:main", ["--config", "tiny", f"train.output_dir={tmp / 'run'}", *overrides])


TRAIN_CASES: list[Case] = [
    ("train-batch-0", _train("train.global_batch_size=0"), r"train\.global_batch_size must be an integer >= 1, got 0"),
    ("train-save-every-0", _train("train.save_every=0"), r"train\.save_every must be an integer >= 1, got 0"),
    ("train-lr-negative", _train("train.learning_rate=-1"), r"train\.learning_rate must be a finite number > 0"),
    ("train-lr-nan", _train("train.learning_rate=.nan"), r"train\.learning_rate must be a finite number > 0, got nan"),
    ("train-seq-len-0", _train("data.seq_len=0"), r"data\.seq_len must be an integer >= 2"),
    ("train-mesh-0", _train("mesh.tensor=0"), r"mesh\.tensor must be >= 1 \(or -1"),
    ("train-mesh-uneven", _train("mesh.fsdp=3"), r"mesh\.fsdp=3 .*(do not divide the \d+ devices|needs 3 devices)"),
    ("train-unknown-key", _train("train.lerning_rate=1"), r"lerning_rate.*learning_rate"),
    ("train-stage", _train("train.stage=stage3"), r"train\.stage must be stage1, stage2 or full"),
    ("train-tokenizer-missing", _train("train.tokenizer=/nonexistent/tok"),
     r"train\.tokenizer \(the tokenizer\): '/nonexistent/tok': tokenizer directory does not exist"),
    ("train-init-from-missing", _train("train.init_from=/nonexistent/ckpt"),
     r"train\.init_from /nonexistent/ckpt: no such directory"),
]

# ---- converters (convert/) -----------------------------------------------------------------------------------------
LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
                "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def _hf_llama_dir(tmp: Path, weights: Callable[[Path], None]) -> Path:
    src = tmp / "hf_llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    weights(src)
    return src


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _huge_header(src: Path) -> None:
    (src / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")


def _offsets_outside(src: Path) -> None:
    header = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [64, 16], "data_offsets": [0, 4096]}}
    (src / "model.safetensors").write_bytes(_safetensors_bytes(header, b"\0" * 100))


def _wrong_shape(src: Path) -> None:
    from g4v_jax.weights import write_safetensors

    write_safetensors(src / "model.safetensors", {"model.embed_tokens.weight": np.zeros((65, 16), np.float32)})


def _malicious_pickle(src: Path) -> None:
    class Payload:  # unpickling it would create the marker file
        def __reduce__(self):
            return (os.system, (f"touch {src / 'pwned'}",))

    torch = pytest.importorskip("torch")
    torch.save({"model.embed_tokens.weight": Payload()}, src / "pytorch_model.bin")


def _convert(module: str, weights: Callable[[Path], None]) -> Callable[[Path], tuple[str, list[str]]]:
    return lambda tmp: (f"{module}:main", [str(_hf_llama_dir(tmp, weights)), str(tmp / "out")])


CONVERT_CASES: list[Case] = [
    ("convert-missing-src", lambda tmp: ("convert.hf_llama:main", [str(tmp / "nope"), str(tmp / "out")]),
     r"checkpoint .*nope does not exist"),
    ("convert-no-config", lambda tmp: ("convert.hf_clip:main", [str(tmp), str(tmp / "out")]),
     r"(no model\.safetensors|config\.json is missing)"),
    ("convert-huge-header", _convert("convert.hf_llama", _huge_header),
     r"model\.safetensors: the header claims 1099511627776 bytes but the file has only 2"),
    ("convert-offsets-outside", _convert("convert.hf_llama", _offsets_outside),
     r"model\.safetensors: tensor 'model\.embed_tokens\.weight': data_offsets \[0, 4096\] lie outside the file's "
     r"100 data bytes"),
    ("convert-mismatch", _convert("convert.hf_llama", _wrong_shape),
     r"convert\.hf_llama: error: checkpoint .*hf_llama does not match the model"),
    ("convert-malicious-pickle", _convert("convert.hf_llama", _malicious_pickle),
     r"pytorch_model\.bin is not a plain weights file .*will not unpickle it"),
    ("assemble-vision-not-clip", lambda tmp: ("convert.assemble:main", [
        "--vision", str(tmp), "--llm", str(_hf_llama_dir(tmp, _wrong_shape)), str(tmp / "out")]),
     r"convert\.assemble: error: .*(config\.json is missing|no model\.safetensors)"),
    ("assemble-missing-llm", lambda tmp: ("convert.assemble:main", [
        "--vision", str(tmp), "--llm", str(tmp / "nope"), str(tmp / "out")]), r"--llm .*nope: no such directory"),
    ("export-not-a-model", lambda tmp: ("convert.export_hf:main", [str(tmp), str(tmp / "out")]),
     r"is not a g4v_jax model directory"),
]

# ---- untrusted input: chat requests, manifests, endpoints (chat.py, data/) -----------------------------------------
def _lines(tmp: Path, name: str, text: str) -> Path:
    (tmp / name).write_text(text)
    return tmp / name


INPUT_CASES: list[Case] = [
    ("chat-missing-ckpt", lambda tmp: ("g4v_jax.chat:main", ["--ckpt", str(tmp / "nope")]),
     r"--ckpt .*nope: no such directory"),
    ("chat-not-a-model", lambda tmp: ("g4v_jax.chat:main", ["--ckpt", str(tmp)]),
     r"not a g4v_jax model directory \(config\.yaml is missing\)"),
    ("manifest-not-json", lambda tmp: ("g4v_jax.data.manifest:main", [
        "check", str(_lines(tmp, "m.jsonl", '{"id": "a", "conversation": [}\n'))]),
     r"m\.jsonl:1: not valid JSON \(Expecting value at column 30\)"),
    ("manifest-bad-turn", lambda tmp: ("g4v_jax.data.manifest:main", [
        "check", str(_lines(tmp, "m.jsonl", '{"id": "a"}\n'))]), r"m\.jsonl:1: .*conversation"),
    ("check-bad-override", lambda tmp: ("g4v_jax.data.check:main", [
        str(_lines(tmp, "m.jsonl", "")), "--config", "tiny", "data.seq_len=0"]),
     r"data\.seq_len must be an integer >= 2"),
    ("qa-plain-http-with-key", lambda tmp: ("g4v_jax.eval.qa:main", [
        "--ckpt", str(tmp), "--data", str(tmp / "qa.jsonl"), "--out", str(tmp / "out"),
        "--judge-url", "http://judge.example.com/v1", "--judge-model", "gpt-4",
        "--judge-key-file", str(_lines(tmp, "key", "sk-secret\n"))]),
     r"refusing to send an API key over plain http to judge\.example\.com"),
    ("qa-empty-key-file", lambda tmp: ("g4v_jax.eval.qa:main", [
        "--ckpt", str(tmp), "--data", str(tmp / "qa.jsonl"), "--out", str(tmp / "out"),
        "--judge-url", "https://judge.example.com/v1", "--judge-model", "gpt-4",
        "--judge-key-file", str(_lines(tmp, "key", "\n"))]), r"judge key file .*key is empty"),
]

# ---- videos and preprocessing (data/video.py) ----------------------------------------------------------------------
def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "clip.mp4")
    return tmp / "clip.mp4"


def _demo(video: Callable[[Path], object]) -> Callable[[Path], tuple[str, list[str]]]:
    return lambda tmp: ("g4v_jax.demo:main", ["--video", str(video(tmp)), "--out", str(tmp / "out")])


VIDEO_CASES: list[Case] = [
    ("video-fifo", _demo(_fifo), r"clip\.mp4' is a FIFO: a video must be a regular file \(or a folder of images\)"),
    ("video-dev-zero", _demo(lambda tmp: "/dev/zero"), r"'/dev/zero' is a character device"),
    ("video-missing", _demo(lambda tmp: tmp / "nope.mp4"), r"nope\.mp4': no such file or directory"),
    ("video-not-a-video", _demo(lambda tmp: _lines(tmp, "notes.mp4", "hello")),
     r"notes\.mp4': opening the video failed"),
    ("video-empty-folder", _demo(lambda tmp: tmp), r"folder has no images"),
    ("video-bad-sampling", lambda tmp: ("g4v_jax.demo:main", ["model.video.sampling=random"]),
     r"video\.sampling must be uniform_mid or mplug_owl, got 'random'"),
]

CASES = TRAIN_CASES + CONVERT_CASES + INPUT_CASES + VIDEO_CASES


@pytest.mark.parametrize("build,pattern", [pytest.param(b, p, id=i) for i, b, p in CASES])
def test_bad_input(build, pattern, tmp_path, capsys):
    spec, argv = build(tmp_path)
    try:
        code = _main(spec)(argv)  # a main that returns its status (g4v_jax.chat) or exits with it
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), f"{lines[0]!r} does not match {pattern!r}"
