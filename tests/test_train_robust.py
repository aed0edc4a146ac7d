"""Training loses nothing: a real signal sent to a real training process, a real read-only directory, a save that
fails the way a full disk fails (the kernel refusing a write), a diverging run, one metrics row per step.

Each stopped run is resumed and must give the loss curve of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from g4v_jax.config import ConfigError, load_config
from g4v_jax.train.metrics import read_metrics
from g4v_jax.train.guards import LossSpikeGuard
from g4v_jax.train import TrainingError, check_run_fits, fit

ROOT = Path(__file__).resolve().parents[1]
# 8 examples, 2 per step: 4 steps an epoch. Stage 2 is text only, so a step takes milliseconds after compiling.
STEPS_PER_EPOCH = 4


def _overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train_manifest={data / 'train.jsonl'}", "data.seq_len=160", f"train.tokenizer={data / 'tokenizer'}",
            f"train.output_dir={out}", "train.global_batch_size=2", "train.warmup_ratio=0", "model.llm.vocab_size=512",
            "train.stage=stage2", "train.learning_rate=3e-2", "train.tensorboard=false", "train.plot=false", *extra]


def _cfg(data, out, *extra):
    return load_config("tiny", _overrides(data, out, *extra))


def _command(data, out, *extra) -> list[str]:
    return [sys.executable, "-m", "g4v_jax.train", "--config", "tiny", *_overrides(data, out, *extra)]


def _env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def _raw_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    path = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.is_file() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.fixture(scope="module")
def straight(train_data, tmp_path_factory):
    """The uninterrupted reference run: 10 epochs, 40 steps."""
    out = tmp_path_factory.mktemp("straight")
    fit(_cfg(train_data, out, "train.epochs=10", "train.save_every=100"), progress=False)
    return _losses(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_saves_and_resume_gives_the_same_curve(sig, train_data, straight, tmp_path):
    """The run checkpoints every 100 steps; a signal after step 3 must still keep every finished step."""
    out = tmp_path / "run"
    cmd = _command(train_data, out, "train.epochs=10", "train.save_every=100")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, 3, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    stopped = int(stderr.split("stopped at step ")[1].split()[0])
    assert 3 <= stopped < 40
    assert f"{sig.name}: stopped at step {stopped} of 40 with a checkpoint in" in stderr
    assert "run the same command again to resume" in stderr
    assert (out / "checkpoints" / str(stopped)).is_dir()
    assert _raw_steps(out) == list(range(1, stopped + 1))

    resumed = subprocess.run(_command(train_data, out, "train.epochs=10", "train.save_every=100"), env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoints'} at step {stopped}" in resumed.stdout
    # the terminal holds the bar and our own lines: compile time apart, no orbax/absl/jax INFO chatter
    assert "compiled the train step in" in resumed.stdout
    assert not [line for line in resumed.stderr.splitlines() if line.startswith("INFO")], resumed.stderr
    assert _raw_steps(out) == list(range(1, 41))  # one row per step: nothing trained twice, nothing missing
    assert _losses(out) == straight
    assert (out / "final" / "model.safetensors").is_file()


def test_a_second_signal_aborts_at_once(train_data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(train_data, out, "train.epochs=500", "train.save_every=1000"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:  # the first signal's notice is printed once the handler has run
        if "send it again to abort at once" in line:
            break
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    # the second signal gets the default action: the process dies of it instead of finishing its save
    assert proc.returncode == -signal.SIGINT
    assert not (out / "final").exists()


def _read_only_dir(path: Path) -> Path:
    """A directory this process cannot write into, also as root (where permission bits do not bind)."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return path
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return path
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                      capture_output=True).returncode == 0:
        return path
    raise AssertionError("cannot make a read-only directory here (no chattr, no mount)")


def _release(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        subprocess.run(["umount", str(path)], capture_output=True)
    else:
        path.chmod(0o755)


def test_a_read_only_output_dir_fails_before_the_model_is_built(train_data, tmp_path, capsys):
    from g4v_jax.train import main

    ro = _read_only_dir(tmp_path / "ro")
    try:
        start = time.perf_counter()
        with pytest.raises(SystemExit) as e:
            main(["--config", "tiny", *_overrides(train_data, ro / "run", "train.epochs=1")])
        elapsed = time.perf_counter() - start
    finally:
        _release(ro)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert f"g4v_jax.train: error: train.output_dir {ro / 'run'} is not writable" in err
    assert elapsed < 5, elapsed  # checked before the tokenizer, the data and the model are loaded


def _with_file_size_limit(limit: int, cmd: list[str]) -> list[str]:
    """``cmd`` run with writes past ``limit`` bytes failing with EFBIG, the way writes to a full disk fail with
    ENOSPC (the kernel refuses the write; SIGXFSZ ignored, so the writer sees the error). Set in a fresh
    interpreter that then execs ``cmd``: no fork of this multithreaded process runs Python code."""
    setup = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); os.execv(sys.argv[1], sys.argv[1:])")
    return [sys.executable, "-c", setup, *cmd]


def test_a_failing_disk_stops_at_once_and_keeps_the_last_checkpoint(train_data, straight, tmp_path):
    out = tmp_path / "run"
    args = ("train.epochs=10", "train.save_every=3")
    fit(_cfg(train_data, out, *args), progress=False, stop_after=3)  # steps 1-3, checkpoint 3
    good = sorted(p.name for p in (out / "checkpoints").iterdir())
    # the next checkpoint's data file is ~20 kB; 10 kB lets the small files (metrics, metadata) through
    full = subprocess.run(_with_file_size_limit(10_000, _command(train_data, out, *args)), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 2, full.stderr
    assert "Traceback" not in full.stderr, full.stderr
    errors = [line for line in full.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, full.stderr
    assert f"saving the checkpoint of step 6 to {out / 'checkpoints'} failed (File too large)" in errors[0]
    assert f"the last complete checkpoint is step 3 in {out / 'checkpoints'}" in errors[0]
    # the save is asynchronous: the loop learns of the failure when the save ends (checked after every step),
    # at the latest when the next save is due (step 9); nothing half-written is left
    assert max(_raw_steps(out)) <= 9
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == good
    assert not (out / "final").exists()

    again = subprocess.run(_command(train_data, out, *args), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "at step 3" in again.stdout
    assert _raw_steps(out) == list(range(1, 41))
    assert _losses(out) == straight


def test_a_failing_disk_on_the_final_model_keeps_the_checkpoints(train_data, tmp_path):
    out = tmp_path / "run"
    args = ("train.epochs=1", "train.save_every=2")
    # checkpoints of LoRA adapters are small; the final directory holds the whole model (~800 kB)
    run = subprocess.run(_with_file_size_limit(200_000, _command(train_data, out, *args)), env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"writing the final model to {out / 'final'} failed (File too large)" in run.stderr
    assert not (out / "final").exists() and not list(out.glob(".final.tmp-*"))
    assert (out / "checkpoints" / "4").is_dir()
    again = subprocess.run(_command(train_data, out, *args), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (out / "final" / "model.safetensors").is_file()


def test_a_learning_rate_far_too_high_stops_instead_of_training_nonsense(train_data, tmp_path):
    """lr 1e6 in stage 2 used to finish "done" with LoRA weights of 2e6 and a gradient norm of 1e-8."""
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        fit(_cfg(train_data, out, "train.learning_rate=1e6", "train.epochs=4"), progress=False)
    message = str(e.value)
    assert "times the norm of the trained weights" in message and "lower train.learning_rate (now 1000000.0)" in message
    assert "batch examples: ['ex" in message and "The update was not applied" in message
    assert not (out / "final").exists()
    # the same run at a sane rate passes the guard
    fit(_cfg(train_data, tmp_path / "sane", "train.epochs=1"), progress=False)
    assert all(r["update_ratio"] < 1 for r in read_metrics(tmp_path / "sane" / "metrics.jsonl"))


def test_the_loss_spike_guard():
    guard = LossSpikeGuard(factor=3.0, window=20)
    assert [guard.check(x) for x in (2.0, 1.8, 1.7, 1.6)] == [None] * 4
    assert guard.check(1.9) is None  # noise
    assert "times its mean" in guard.check(12.0)
    small = LossSpikeGuard(factor=3.0, window=20)
    assert [small.check(x) for x in (0.1, 0.1, 0.1, 0.6)] == [None] * 4  # 6x, but only half a nat: not a spike
    assert LossSpikeGuard(factor=0, window=20).check(1e9) is None


def test_a_global_batch_the_processes_cannot_share_is_a_config_error():
    from g4v_jax.sharding import make_mesh

    cfg = load_config("tiny", ["train.global_batch_size=2"])
    with pytest.raises(ConfigError, match=r"train.global_batch_size=2 .* 2 rows per micro-batch, which 4 processes "
                                          r"cannot share evenly"):
        check_run_fits(cfg, make_mesh(cfg.mesh), hosts=4)


def test_mesh_axes_that_do_not_divide_the_devices_are_named():
    from g4v_jax.config import MeshConfig
    from g4v_jax.sharding import make_mesh

    devices = [object()] * 8  # the check runs before any device is touched
    with pytest.raises(ConfigError, match=r"mesh.fsdp=3 \(product 3\) do not divide the 8 devices"):
        make_mesh(MeshConfig(data=1, fsdp=3, tensor=1), devices)
    with pytest.raises(ConfigError, match=r"mesh.data=3 \(product 3\) do not divide the 8 devices, so the -1"):
        make_mesh(MeshConfig(data=3, fsdp=-1, tensor=1), devices)
