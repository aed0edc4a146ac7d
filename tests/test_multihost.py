"""Two real JAX processes (multi-controller runtime, gloo collectives on CPU) train like one process.

Each process feeds its own half of the global batch; ``jax.make_array_from_process_local_data`` assembles the global
arrays on a data=2 mesh spanning both processes' devices. Losses must equal a single-process run on the whole batch.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
sys.path.insert(0, "tests")
from g4v_jax.train import maybe_initialize_distributed, build_trainer
maybe_initialize_distributed()
from test_train import synthetic_batch
from g4v_jax.config import load_config

n, i = jax.process_count(), jax.process_index()
cfg = load_config("tiny", ["train.stage=stage2", "train.global_batch_size=4", "train.learning_rate=1e-2",
                           "train.warmup_ratio=0", "model.lora.dropout=0.0",
                           f"mesh.data={jax.device_count()}", "mesh.fsdp=1", "mesh.tensor=1"])
trainer = build_trainer(cfg, total_steps=10)
rows = slice(i * 4 // n, (i + 1) * 4 // n)
batches = [{k: v[rows] for k, v in synthetic_batch(cfg.model, batch=4, seed=s).items()} for s in range(3)]
losses = [m["loss"] for m in trainer.train_steps(iter(batches), 3)]
print("RESULT", json.dumps({"process": i, "devices": jax.device_count(), "losses": losses}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(env_extra: dict, n: int) -> list[dict]:
    procs = []
    for i in range(n):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **env_extra)
        if n > 1:
            env.update(G4V_NUM_PROCESSES=str(n), G4V_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, out + err
        results.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
    return results


def test_two_processes_train_like_one():
    (single,) = _run({}, 1)
    pair = _run({"G4V_COORDINATOR": f"127.0.0.1:{_free_port()}"}, 2)
    print(f"one process: {single['losses']}")
    for r in pair:
        print(f"process {r['process']} of 2 ({r['devices']} global devices): {r['losses']}")
        assert r["devices"] == 2
        np.testing.assert_allclose(r["losses"], single["losses"], rtol=1e-5)
