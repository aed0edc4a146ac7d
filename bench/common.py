"""What every benchmark row shares: the suites (sizes, dtype, device), timing and pairing, work counts, the
machine's peak probes, the two models (the HF peer and ours converted from its saved files), peak memory, and
running a row's side in a fresh process (``in_child``)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RUN = Path(__file__).resolve().parent / "run.py"

@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    device: str  # "cpu" | "cuda"
    dtype: str  # weights and compute: "float32" | "bfloat16"
    llm: dict  # HF LlamaConfig fields
    vit: dict  # HF CLIPVisionConfig fields
    prefill: tuple[int, int]  # batch, length
    decode: tuple[int, int, tuple[int, ...]]  # prompt, new tokens, batch sizes
    engine: dict  # requests, slots, prompt (lo, hi), budget (lo, hi)
    lora: dict  # batch, length, steps
    vit_frames: int
    gpt4video: str = ""  # config for the GPT4Video rows (stage-1 step, one video question); "" = none
    stage1: tuple[int, int] = (8, 128)  # batch, text length around the video
    lora_rounds: int = 2


SMOLLM = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
              rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)
TINY_LLM = dict(SMOLLM, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
               image_size=224, hidden_act="quick_gelu")
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               patch_size=14, image_size=224, hidden_act="quick_gelu")
TINY_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=16,
                image_size=64, hidden_act="quick_gelu")

SUITES = {
    "cpu": Suite("cpu", "cpu", "float32", SMOLLM, VIT_B16, prefill=(1, 512), decode=(64, 64, (1, 8)),
                 engine=dict(requests=32, slots=8, prompt=(16, 200), budget=(8, 128)),
                 lora=dict(batch=4, length=256, steps=4), vit_frames=16),
    "gpu": Suite("gpu", "cuda", "bfloat16", LLAMA_7B, VIT_L14, prefill=(4, 2048), decode=(128, 128, (1, 8)),
                 engine=dict(requests=64, slots=32, prompt=(16, 512), budget=(16, 256)),
                 lora=dict(batch=2, length=2048, steps=5), vit_frames=64, gpt4video="gpt4video_7b", lora_rounds=1),
}
LORA = dict(rank=16, alpha=16.0, dropout=0.1, targets=("q_proj", "v_proj"), lr=1e-4)
# our side's settings. Training runs its layers under jax.lax.scan (the first step compiles in a third of the time, at
# the same step time and less memory); inference keeps the unrolled layers, which decode 10-25% faster at batch 8 on
# the CPU (bench/NOTES.md); the decode row reports the scanned model's compile time and rate beside.
OURS_TRAIN = ["model.scan_layers=true"]
OURS_INFER = ["model.scan_layers=false"]


def tiny(suite: Suite) -> Suite:
    return dataclasses.replace(suite, name=f"{suite.name} (tiny)", device="cpu", llm=TINY_LLM, vit=TINY_VIT,
                               prefill=(2, 64), decode=(16, 8, (1, 4)),
                               engine=dict(requests=6, slots=2, prompt=(4, 40), budget=(2, 12)),
                               lora=dict(batch=2, length=32, steps=2), vit_frames=4,
                               gpt4video="tiny" if suite.gpt4video else "", stage1=(2, 16), lora_rounds=1)


def hf_cb_config(slots: int, length: int, **kw):
    """transformers' continuous-batching config with our engine's cache: ``slots`` x ``length`` positions. On CPU,
    transformers otherwise sizes its KV cache from the machine's whole RAM (14-15 GB peak RSS on the tiny benches),
    and a test beside it is lost to the OOM killer."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = 32
    # transformers renamed block_size to page_size (the old name warns); the pin allows releases from before
    name = "page_size" if "page_size" in inspect.signature(ContinuousBatchingConfig).parameters else "block_size"
    return ContinuousBatchingConfig(max_requests_per_batch=slots, num_blocks=slots * -(-length // page),
                                    max_batch_tokens=length, **{name: page}, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# timing and counting
# ----------------------------------------------------------------------------------------------------------------------


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_result(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def paired(ours, peer, reps: int) -> tuple[float, float]:
    """Median seconds of each, alternating ours/peer rep by rep (one untimed warm call each first)."""
    ours(), peer()
    a, b = [], []
    for _ in range(reps):
        a.append(timed(ours))
        b.append(timed(peer))
    return statistics.median(a), statistics.median(b)


def layer_matmul_params(d: int, heads: int, kv_heads: int, head: int, ffn: int, glu: bool) -> int:
    return d * heads * head * 2 + d * kv_heads * head * 2 + d * ffn * (3 if glu else 2)


def llm_params(llm: dict) -> tuple[int, int]:
    """(weights every token multiplies by in the layers, the LM head's): a prefill needs the head at one position."""
    d, h, kv = llm["hidden_size"], llm["num_attention_heads"], llm["num_key_value_heads"]
    layers = llm["num_hidden_layers"] * layer_matmul_params(d, h, kv, d // h, llm["intermediate_size"], glu=True)
    return layers, d * llm["vocab_size"]


def attention_flops(batch: int, length: int, layers: int, width: int) -> int:
    """Forward QKᵀ and PV over the full L×L square (what both sides compute), all layers."""
    return 4 * batch * length * length * width * layers


def torch_dtype(suite: Suite):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[suite.dtype]


def our_dtypes(suite: Suite) -> list[str]:
    return [f"model.param_dtype={suite.dtype}", f"model.compute_dtype={suite.dtype}"]


def sync(suite: Suite) -> None:
    if suite.device == "cuda":
        import torch

        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------------
# probes and models
# ----------------------------------------------------------------------------------------------------------------------


def probes(suite: Suite, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    n = 1024 if suite.device == "cpu" else 8192
    dtype = jnp.dtype(suite.dtype)
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda a: a @ a)
    xt = torch.randn(n, n, device=suite.device, dtype=torch_dtype(suite))

    def peer():
        torch.mm(xt, xt)
        sync(suite)

    t_jax, t_torch = paired(lambda: mm(x).block_until_ready(), peer, max(reps, 5))
    out = {"matmul_tflops_jax": 2 * n**3 / t_jax / 1e12, "matmul_tflops_torch": 2 * n**3 / t_torch / 1e12,
           "matmul_n": n}
    if suite.device == "cpu":
        buf = np.ones(64 * 2**20 // 8)  # 64 MiB
        dst = np.empty_like(buf)
        t_copy = statistics.median(timed(lambda: np.copyto(dst, buf)) for _ in range(max(reps, 5)))
        out["bandwidth_gbs"] = 2 * buf.nbytes / t_copy / 1e9
    else:
        big = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB device-to-device copy
        dst = torch.empty_like(big)
        dst.copy_(big)
        sync(suite)
        t_copy = statistics.median(timed(lambda: (dst.copy_(big), sync(suite))) for _ in range(max(reps, 5)))
        out["bandwidth_gbs"] = 2 * big.numel() / t_copy / 1e9
        out["card"] = torch.cuda.get_device_name()
    return out


def models(suite: Suite, tmp: Path):
    """The HF peer (on the suite's device and dtype) and ours converted from its saved files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from g4v_jax.convert.hf_llama import load_hf_llama

    torch.manual_seed(0)
    with torch.device(suite.device):
        hf = LlamaForCausalLM(LlamaConfig(**suite.llm, attn_implementation="sdpa")).to(torch_dtype(suite)).eval()
    hf.save_pretrained(tmp / "llm")
    _, ours = load_hf_llama(tmp / "llm", [*OURS_INFER, *our_dtypes(suite)])
    return hf, ours


def token_ids(suite: Suite, shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, suite.llm["vocab_size"], shape).astype(np.int32)

def peak_memory_gib(suite: Suite, side: str) -> float:
    """Peak device memory on a GPU; on the CPU this process's peak RSS (VmHWM, not ``ru_maxrss``, which survives
    exec, so a child would report its parent's peak)."""
    if suite.device == "cuda":
        if side == "peer":
            import torch

            return torch.cuda.max_memory_allocated() / 2**30
        import jax

        return jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (peak RSS needs Linux)")


def reset_peak_memory(suite: Suite) -> None:
    """Count the peak from here, so that it is the training's, not the loading's: the two sides load weights
    differently (our converter reads safetensors into host arrays, HF maps the file). (JAX's device peak cannot be
    reset; on a GPU our weights are loaded straight to the device, so its peak is the training's already.)"""
    if suite.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current RSS
        except OSError as e:  # a read-only /proc (some containers): the peak then includes the loading
            print(f"bench/run.py: cannot reset the peak RSS ({e}); it includes the weights' loading", file=sys.stderr)


def in_child(name: str, suite_args: list[str], src: str) -> dict:
    """Run ``CHILDREN[name]`` in a fresh interpreter and return its JSON."""
    out = subprocess.run([sys.executable, str(RUN), *suite_args, "--child", name, "--src", src],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench child {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])

def log(suite: Suite, rows: list[dict]) -> None:
    print(f"[{suite.name}] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Context:
    """What a suite's rows get: the suite, how to rerun it in a child (``suite_args``), the reps, the peak probes, a
    temporary folder, and the two LLMs (``models``), loaded on first use and saved under ``tmp / "llm"``."""

    suite: Suite
    suite_args: list[str]
    reps: int
    peak: dict
    tmp: Path
    _models: tuple | None = None

    def models(self):
        """(the HF peer, ours converted from its saved files)."""
        if self._models is None:
            self._models = models(self.suite, self.tmp)
        return self._models

    def llm_dir(self) -> Path:
        """The peer's saved weights (what fresh processes load), with the models released from this one."""
        if not (self.tmp / "llm").is_dir():
            self.models()
        self.release_models()
        return self.tmp / "llm"

    def release_models(self) -> None:
        self._models = None
