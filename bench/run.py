"""Our hot paths beside the PyTorch stack, in one run, on the same weights: ``python bench/run.py --suite cpu``.

(~830 lines: one script a lent GPU runs as it is; each row is a function of its own.)

    python bench/run.py --suite cpu|gpu|all [--tiny] [--rows prefill,decode,...] [--reps 3] [--json out.json]
                        [--markdown out.md]

Suites (one ``Suite`` each; every row is the same code on every suite, only sizes, dtype and device differ):
- ``cpu``: fp32 on the CPU, a SmolLM2-135M-shaped LLaMA (vocab 49152, hidden 576, 30 layers, 9 heads, 3 KV heads)
  and CLIP ViT-B/16;
- ``gpu``: bf16 weights (fp32 LoRA adapters) on the first CUDA device, LLaMA-7B and CLIP ViT-L/14 (paper sizes);
- ``--tiny``: the chosen suite's rows on toy sizes, on the CPU, in a few minutes (what CI runs to keep the GPU
  script working while no GPU is lent).

Random weights are drawn once by HF (``LlamaForCausalLM`` / ``CLIPVisionModel``), saved, and converted by our
converters, so both sides hold identical numbers. Rows:
- peak probes measured here: the matmul rate (jax and torch) and, on the CPU, memory bandwidth (a STREAM-like copy);
- prefill (logits at the last position only on both sides: HF's ``logits_to_keep=1``, our ``logits_at``);
- greedy decode at batch 1 and 8 (ours ``inference.generate``, HF ``generate``; the tokens are compared), with the
  first call's compile time and, at batch 1, the bandwidth limit (weight bytes / measured bandwidth);
- the engine: every request at t = 0, mixed prompts and budgets, our ``Engine`` beside transformers' own
  continuous batching (paged attention), the same number of slots;
- the LoRA r16 q/v train step (ours: ``train.build_trainer`` stage 2, with and without ``remat=dots``; the peer: HF +
  PEFT + torch AdamW), each side in fresh processes for its peak memory;
- CLIP ViT frames/s.
Timed figures are medians of ``--reps`` runs, the two sides alternating rep by rep (the fairest pairing on a shared
machine). The "limit" column is the machine's own: the best measured matmul rate over the row's multiply-adds, or the
measured bandwidth over the bytes a decode step must read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# two frameworks share one GPU here: JAX must not take 75% of it up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


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


# ----------------------------------------------------------------------------------------------------------------------
# rows in this process
# ----------------------------------------------------------------------------------------------------------------------


def prefill_row(suite: Suite, hf, ours, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from g4v_jax.models.llama import init_cache

    batch, length = suite.prefill
    ids = token_ids(suite, (batch, length), 0)
    graphdef, state = nnx.split(ours)

    @jax.jit
    def prefill(state, ids):
        model = nnx.merge(graphdef, state)
        cache = init_cache(model.cfg, batch, length, jnp.dtype(suite.dtype))
        return model(ids, cache=cache, logits_at=jnp.full((batch,), length - 1, jnp.int32))

    tids = torch.from_numpy(ids).long().to(suite.device)

    def peer():
        with torch.no_grad():
            out = hf(tids, use_cache=True, logits_to_keep=1).logits
        sync(suite)
        return out

    ours_logits = np.asarray(prefill(state, ids)[0], np.float32)[:, -1]
    peer_logits = peer()[:, -1].float().cpu().numpy()
    t_ours, t_peer = paired(lambda: jax.block_until_ready(prefill(state, ids)), peer, reps)
    layers, head = llm_params(suite.llm)
    flops = (2 * batch * length * layers + 2 * batch * head
             + attention_flops(batch, length, suite.llm["num_hidden_layers"], suite.llm["hidden_size"]))
    tokens = batch * length
    return {"work": f"prefill {batch}×{length}", "unit": "tok/s", "ours": tokens / t_ours, "peer": tokens / t_peer,
            "flops": flops / tokens, "max_abs_logit_diff": float(np.abs(ours_logits - peer_logits).max())}


def matching_prefix(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the fraction of tokens before the first difference (bf16 kernels may part ways)."""
    fracs = []
    for x, y in zip(a, b):
        differ = np.nonzero(x != y)[0]
        fracs.append((differ[0] if len(differ) else len(x)) / len(x))
    return float(np.mean(fracs))


def decode_rows(suite: Suite, hf, ours, scanned, reps: int, bandwidth: float) -> list[dict]:
    """``scanned``: ours with ``scan_layers`` on, whose first call and rate go in the notes."""
    import jax
    import torch

    from g4v_jax.inference.generate import SamplingConfig, generate

    rows = []
    prompt, new, batches = suite.decode
    for batch in batches:
        ids = token_ids(suite, (batch, prompt), batch)
        inputs = {"input_ids": ids, "attention_mask": np.ones((batch, prompt), bool)}
        cfg = SamplingConfig(max_new_tokens=new)
        jax.clear_caches()
        first = timed(lambda: generate(ours, inputs, cfg, eos_id=-1))
        tids = torch.from_numpy(ids).long().to(suite.device)

        def peer():
            with torch.no_grad():
                out = hf.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, pad_token_id=0)
            sync(suite)
            return out

        ours_tokens = np.asarray(generate(ours, inputs, cfg, eos_id=-1).tokens)
        peer_tokens = peer()[:, prompt:].cpu().numpy()
        t_ours, t_peer = paired(lambda: generate(ours, inputs, cfg, eos_id=-1), peer, reps)
        jax.clear_caches()
        scan_first = timed(lambda: generate(scanned, inputs, cfg, eos_id=-1))
        t_scan = statistics.median(timed(lambda: generate(scanned, inputs, cfg, eos_id=-1)) for _ in range(reps))
        row = {"work": f"greedy decode, batch {batch}, {prompt}+{new}", "unit": "tok/s",
               "ours": batch * new / t_ours, "peer": batch * new / t_peer, "first_call_s": first,
               "tokens_match": matching_prefix(ours_tokens, peer_tokens),
               "scan": (scan_first, batch * new / t_scan)}
        if batch == 1:
            weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
            row["limit"] = bandwidth * 1e9 / weight_bytes  # each token reads every weight once
        rows.append(row)
    return rows


def engine_requests(suite: Suite, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    w = suite.engine
    return [(rng.integers(3, suite.llm["vocab_size"], int(rng.integers(w["prompt"][0], w["prompt"][1] + 1))
                          ).astype(np.int32), int(rng.integers(w["budget"][0], w["budget"][1] + 1)))
            for _ in range(w["requests"])]


def engine_row(suite: Suite, hf, ours) -> dict:
    """Every request at t = 0, greedy, no EOS: our ``Engine`` beside transformers' continuous batching
    (``continuous_batching_context_manager``, paged attention, at most as many requests per batch as our slots).
    One timed run each after a warm-up run; tokens compared request by request."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from g4v_jax.config import EngineConfig
    from g4v_jax.inference.engine import Engine, EngineRequest
    from g4v_jax.inference.generate import SamplingConfig, pow2

    work = engine_requests(suite)
    slots = suite.engine["slots"]
    engine = Engine(ours, None, EngineConfig(num_slots=slots, max_length=pow2(max(len(p) + b for p, b in work)),
                                             min_bucket=32, max_queue=len(work)), eos_id=-1)
    first = timed(engine.warmup)

    def run_ours():
        handles = [engine.submit(EngineRequest(p, [], SamplingConfig(b), id=i)) for i, (p, b) in enumerate(work)]
        engine.run()
        return [list(h.result().tokens) for h in handles]

    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=suite.engine["budget"][1])
    cb = ContinuousBatchingConfig(max_requests_per_batch=slots)

    run_ours()  # warm-up, as the peer's below
    t_ours, ours_tokens = timed_result(run_ours)
    # one manager for the warm-up and the timed run: its start-up (cache sizing, warm-up) is not the workload, as
    # our engine's warmup() is not; ours ran first, so that the manager's thread never competes with it
    with torch.no_grad(), hf.continuous_batching_context_manager(
            generation_config=gen, continuous_batching_config=cb, block=True, timeout=5) as manager:

        def run_peer(tag: str):
            ids = [manager.add_request(p.tolist(), request_id=f"{tag}{i}", max_new_tokens=b)
                   for i, (p, b) in enumerate(work)]
            done = {}
            while len(done) < len(ids):
                r = manager.get_result(timeout=1)
                if r is not None and r.is_finished():
                    done[r.request_id] = list(r.generated_tokens)
            return [done[i] for i in ids]

        run_peer("warm")
        t_peer, peer_tokens = timed_result(lambda: run_peer("timed"))
    total = sum(b for _, b in work)
    w = suite.engine
    return {"work": f"engine: {len(work)} requests at once, prompts {w['prompt'][0]}-{w['prompt'][1]}, budgets "
                    f"{w['budget'][0]}-{w['budget'][1]}, {slots} slots", "unit": "tok/s",
            "ours": total / t_ours, "peer": total / t_peer, "first_call_s": first,
            "requests_match": sum(a == b for a, b in zip(ours_tokens, peer_tokens)), "requests": len(work)}


def vit_row(suite: Suite, tmp: Path, reps: int) -> dict:
    """CLIP ViT on ``vit_frames`` frames: ours (``CLIPVisionTower``, normalisation included) beside HF
    ``CLIPVisionModel`` (sdpa) on the same weights and pixels."""
    import jax
    import torch
    from flax import nnx
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from g4v_jax.convert.hf_clip import load_hf_clip_vision
    from g4v_jax.models.clip_vit import normalize_frames

    torch.manual_seed(0)
    with torch.device(suite.device):
        hf = CLIPVisionModel(CLIPVisionConfig(**suite.vit, attn_implementation="sdpa")).to(torch_dtype(suite)).eval()
    hf.save_pretrained(tmp / "vit")
    _, tower = load_hf_clip_vision(tmp / "vit", dtype=suite.dtype)
    frames, size = suite.vit_frames, suite.vit["image_size"]
    pixels = np.random.default_rng(0).random((1, frames, size, size, 3), dtype=np.float32)
    graphdef, state = nnx.split(tower)
    encode = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x).last_hidden_state)
    normalized = (torch.from_numpy(np.asarray(normalize_frames(pixels[0]))).permute(0, 3, 1, 2).contiguous()
                  .to(suite.device, torch_dtype(suite)))

    def peer():
        with torch.no_grad():
            out = hf(pixel_values=normalized).last_hidden_state
        sync(suite)
        return out

    diff = float(np.abs(np.asarray(encode(state, pixels), np.float32)[0] - peer().float().cpu().numpy()).max())
    t_ours, t_peer = paired(lambda: encode(state, pixels).block_until_ready(), peer, reps)
    width, patch = suite.vit["hidden_size"], suite.vit["patch_size"]
    patches = (size // patch) ** 2
    heads = suite.vit["num_attention_heads"]
    layers = suite.vit["num_hidden_layers"]
    per_frame = (2 * (patches + 1) * layers * layer_matmul_params(width, heads, heads, width // heads,
                                                                  suite.vit["intermediate_size"], glu=False)
                 + attention_flops(1, patches + 1, layers, width) + 2 * patches * 3 * patch * patch * width)
    return {"work": f"CLIP ViT ({width} wide, {layers} layers, patch {patch}), {frames} frames", "unit": "frames/s",
            "ours": frames / t_ours, "peer": frames / t_peer, "flops": per_frame, "max_abs_diff": diff}


# ----------------------------------------------------------------------------------------------------------------------
# rows measured in fresh processes (peak memory is a per-process high-water mark)
# ----------------------------------------------------------------------------------------------------------------------


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


def lora_batch(suite: Suite) -> dict:
    ids = token_ids(suite, (suite.lora["batch"], suite.lora["length"]), 0)
    labels = ids.copy()
    labels[:, : suite.lora["length"] // 2] = -100  # loss on the second half ("answer") only, on both sides
    return {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids, bool)}


def child_lora_ours(suite: Suite, src: str, remat: str = "none") -> dict:
    """Our stage-2 trainer (``train.build_trainer``) on the converted weights: seconds per step, peak memory."""
    import jax

    from g4v_jax.convert.hf_llama import load_hf_llama
    from g4v_jax.config import load_config
    from g4v_jax.train import build_trainer

    lora = [f"model.lora.rank={LORA['rank']}", f"model.lora.alpha={LORA['alpha']}",
            f"model.lora.dropout={LORA['dropout']}", f"model.lora.targets=[{','.join(LORA['targets'])}]"]
    model_cfg, model = load_hf_llama(src, [*OURS_TRAIN, *our_dtypes(suite), *lora, f"model.remat={remat}"])
    cfg = load_config("tiny", ["train.stage=stage2", f"train.global_batch_size={suite.lora['batch']}",
                               f"train.learning_rate={LORA['lr']}", "train.warmup_ratio=0", "train.weight_decay=0.0"])
    trainer = build_trainer(dataclasses.replace(cfg, model=model_cfg), total_steps=100, model=model)
    del model
    reset_peak_memory(suite)
    batch = lora_batch(suite)
    first = timed(lambda: trainer.train_steps(iter([batch]), 1))
    times, losses = [], []
    for _ in range(suite.lora["steps"]):
        t0 = time.perf_counter()
        losses.append(trainer.train_steps(iter([batch]), 1)[0]["loss"])  # reading the loss waits for the step
        times.append(time.perf_counter() - t0)
    jax.effects_barrier()
    return {"step_s": statistics.median(times), "first_step_s": first, "losses": losses,
            "peak_gib": peak_memory_gib(suite, "ours")}


def child_lora_peer(suite: Suite, src: str) -> dict:
    """HF LlamaForCausalLM + PEFT LoRA + torch AdamW (grad clip 1.0, as ours), the same batch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(src, attn_implementation="sdpa", dtype=torch_dtype(suite))
    model = get_peft_model(model.to(suite.device),
                           LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                      target_modules=list(LORA["targets"]), bias="none"))
    for p in model.parameters():  # adapters in fp32 over a bf16 base, as ours
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LORA["lr"], weight_decay=0.0)
    batch = {k: torch.from_numpy(v).to(suite.device) for k, v in lora_batch(suite).items()}
    batch["input_ids"], batch["labels"] = batch["input_ids"].long(), batch["labels"].long()
    reset_peak_memory(suite)

    def step():
        with torch.autocast(suite.device, dtype=torch_dtype(suite), enabled=suite.dtype != "float32"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)  # waits for the step

    first = timed(step)
    times, losses = [], []
    for _ in range(suite.lora["steps"]):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "first_step_s": first, "losses": losses,
            "peak_gib": peak_memory_gib(suite, "peer")}


def random_gpt4video(suite: Suite):
    """The suite's GPT4Video with random weights drawn on the device (a host draw of 7B values takes minutes; the
    figures below do not depend on the values)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from g4v_jax.config import load_config
    from g4v_jax.models.gpt4video import abstract_model
    from g4v_jax.weights import materialize

    cfg = load_config(suite.gpt4video, [*OURS_TRAIN, *our_dtypes(suite)]).model
    graphdef, params, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    leaves = [(0.02 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype) for k, x in zip(keys, leaves)]
    return cfg, nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), jax.tree.map(materialize, rest))


def video_batch(cfg, batch: int, text: int, seed: int = 0) -> dict:
    """``batch`` rows of ``text`` tokens around one video each (the answer half labelled)."""
    rng = np.random.default_rng(seed)
    k, t, s = cfg.num_video_tokens, cfg.num_frames, cfg.vision.image_size
    ids = rng.integers(3, cfg.llm.vocab_size, (batch, text + k)).astype(np.int32)
    ids[:, 4:4 + k] = -1
    labels = ids.copy()
    labels[:, : (text + k) // 2] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids, bool),
            "videos": rng.integers(0, 256, (batch, 1, t, s, s, 3), dtype=np.uint8),
            "frame_mask": np.ones((batch, 1, t), bool)}


def child_stage1(suite: Suite, src: str) -> dict:
    """Our stage-1 step (the abstractor trained, the towers frozen) on ``stage1`` = (batch, text) with one video of
    T frames per row."""
    import jax

    from g4v_jax.config import load_config
    from g4v_jax.train import build_trainer

    model_cfg, model = random_gpt4video(suite)
    batch_size, text = suite.stage1
    cfg = load_config("tiny", ["train.stage=stage1", f"train.global_batch_size={batch_size}", "train.warmup_ratio=0"])
    trainer = build_trainer(dataclasses.replace(cfg, model=model_cfg), total_steps=100, model=model)
    del model
    batch = video_batch(model_cfg, batch_size, text)
    first = timed(lambda: trainer.train_steps(iter([batch]), 1))
    times = [timed(lambda: trainer.train_steps(iter([batch]), 1)) for _ in range(3)]
    jax.effects_barrier()
    return {"step_s": statistics.median(times), "first_step_s": first, "peak_gib": peak_memory_gib(suite, "ours"),
            "tokens": batch["input_ids"].size, "frames": batch_size * model_cfg.num_frames}


def child_video_question(suite: Suite, src: str) -> dict:
    """One question about one video through the engine (what the server does per request): a 48-token question
    around the video, 64 new tokens, greedy; seconds to the first token and to the last, after a warm-up."""
    from g4v_jax.config import EngineConfig
    from g4v_jax.inference.engine import Engine, EngineRequest
    from g4v_jax.inference.generate import SamplingConfig

    model_cfg, model = random_gpt4video(suite)
    batch = video_batch(model_cfg, 1, 48)
    video = (batch["videos"][0, 0], batch["frame_mask"][0, 0])
    engine = Engine(model, None, EngineConfig(num_slots=1, max_length=512, max_videos=1), eos_id=-1)
    first = timed(engine.warmup)

    def ask():
        handle = engine.submit(EngineRequest(batch["input_ids"][0], [video], SamplingConfig(64), id=0))
        engine.run()
        return handle.result()

    ask()
    runs = [timed_result(ask) for _ in range(3)]
    return {"total_s": statistics.median(t for t, _ in runs), "ttft_s": statistics.median(r.ttft for _, r in runs),
            "first_call_s": first}


def gpt4video_rows(suite: Suite, suite_args: list[str]) -> list[dict]:
    """Ours only: the peer would be mPLUG-Owl's own training and serving code, which is not installed here."""
    s1 = in_child("stage1-ours", suite_args, "")
    qa = in_child("video-question-ours", suite_args, "")
    batch, _ = suite.stage1
    return [{"work": f"stage-1 step ({suite.gpt4video}), batch {batch} × 1 video of "
                     f"{s1['frames'] // batch} frames, {s1['tokens'] // batch} tokens", "unit": "frames/s",
             "ours": s1["frames"] / s1["step_s"], "peer": None, "first_call_s": s1["first_step_s"],
             "peak_gib": (s1["peak_gib"], None), "tokens_per_s": s1["tokens"] / s1["step_s"]},
            {"work": f"one video question ({suite.gpt4video}), 64 new tokens, end to end through the engine",
             "unit": "s", "ours": qa["total_s"], "peer": None, "ttft_s": qa["ttft_s"],
             "first_call_s": qa["first_call_s"]}]


CHILDREN = {"stage1-ours": child_stage1, "video-question-ours": child_video_question, "lora-ours": child_lora_ours, "lora-ours-remat-dots": lambda s, src: child_lora_ours(s, src, "dots"),
            "lora-peer": child_lora_peer}


def in_child(name: str, suite_args: list[str], src: str) -> dict:
    """Run ``CHILDREN[name]`` in a fresh interpreter and return its JSON."""
    out = subprocess.run([sys.executable, __file__, *suite_args, "--child", name, "--src", src],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench child {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def lora_rows(suite: Suite, suite_args: list[str], src: Path) -> list[dict]:
    """Ours (without and with ``remat=dots``) and the peer alternate, ``lora_rounds`` fresh processes each; medians
    of the step time, max of the peak memory (counted from the first step)."""
    runs = {"lora-ours": [], "lora-ours-remat-dots": [], "lora-peer": []}
    for _ in range(suite.lora_rounds):
        for name in runs:
            runs[name].append(in_child(name, suite_args, str(src)))
    batch, length = suite.lora["batch"], suite.lora["length"]
    tokens = batch * length
    peer = runs.pop("lora-peer")
    t_peer = statistics.median(r["step_s"] for r in peer)
    layers, head = llm_params(suite.llm)
    # 2·N flops forward plus 2·N for the input gradients (a frozen base has no weight gradients): issue 24's 4N
    flops = (4 * tokens * (layers + head)
             + 3 * attention_flops(batch, length, suite.llm["num_hidden_layers"], suite.llm["hidden_size"]))
    rows = []
    for name, ours in runs.items():
        t_ours = statistics.median(r["step_s"] for r in ours)
        rows.append({"work": f"LoRA r{LORA['rank']} q/v train step, {batch}×{length}, AdamW"
                             + (", remat dots" if "remat" in name else ""), "unit": "tok/s",
                     "ours": tokens / t_ours, "peer": tokens / t_peer, "flops": flops / tokens,
                     "peak_gib": (max(r["peak_gib"] for r in ours), max(r["peak_gib"] for r in peer)),
                     "first_call_s": statistics.median(r["first_step_s"] for r in ours),
                     "first_loss": (ours[0]["losses"][0], peer[0]["losses"][0])})
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# the suite
# ----------------------------------------------------------------------------------------------------------------------


def log(suite: Suite, rows: list[dict]) -> None:
    print(f"[{suite.name}] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)


ROW_GROUPS = ("prefill", "decode", "engine", "lora", "vit", "gpt4video")


def run_suite(suite: Suite, suite_args: list[str], reps: int, groups: tuple[str, ...] = ROW_GROUPS) -> dict:
    """The suite's rows of ``groups`` (a lent GPU's minutes are few: run the groups in several calls if need be)."""
    import jax
    import torch

    from g4v_jax.convert.hf_llama import load_hf_llama

    peak = probes(suite, reps)
    print(f"[{suite.name}] probes {peak}", file=sys.stderr, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf, ours = models(suite, tmp) if {"prefill", "decode", "engine", "lora"} & set(groups) else (None, None)
        if "prefill" in groups:
            rows.append(prefill_row(suite, hf, ours, reps))
            log(suite, rows)
        if "decode" in groups:
            _, scanned = load_hf_llama(tmp / "llm", [*OURS_TRAIN, *our_dtypes(suite)])
            rows += decode_rows(suite, hf, ours, scanned, reps, peak["bandwidth_gbs"])
            del scanned
            log(suite, rows)
        if "engine" in groups:
            rows.append(engine_row(suite, hf, ours))
            log(suite, rows)
        del hf, ours
        if "lora" in groups:
            rows += lora_rows(suite, suite_args, tmp / "llm")
            log(suite, rows)
        if "vit" in groups:
            rows.append(vit_row(suite, tmp, reps))
            log(suite, rows)
        if "gpt4video" in groups and suite.gpt4video:
            rows += gpt4video_rows(suite, suite_args)
    return {"suite": suite.name, "machine": platform.node(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg(), "jax": jax.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "dtype": suite.dtype,
            "peak": peak, "rows": rows}


def _notes(r: dict) -> list[str]:
    notes = []
    if "tokens_match" in r:
        notes.append(f"tokens equal for {100 * r['tokens_match']:.0f}% of the sequence")
    if "max_abs_logit_diff" in r:
        notes.append(f"max abs logit difference {r['max_abs_logit_diff']:.1e}")
    if "max_abs_diff" in r:
        notes.append(f"max abs feature difference {r['max_abs_diff']:.1e}")
    if "requests_match" in r:
        notes.append(f"tokens equal on {r['requests_match']}/{r['requests']} requests")
    if "peak_gib" in r and r["peak_gib"][1] is None:
        notes.append(f"peak memory {r['peak_gib'][0]:.2f} GiB")
    elif "peak_gib" in r:
        notes.append(f"peak memory {r['peak_gib'][0]:.2f} / {r['peak_gib'][1]:.2f} GiB (ours / peer)")
    if "tokens_per_s" in r:
        notes.append(f"{r['tokens_per_s']:.0f} tok/s")
    if "ttft_s" in r:
        notes.append(f"first token after {r['ttft_s']:.3f} s")
    if "first_loss" in r:
        notes.append(f"first loss {r['first_loss'][0]:.3f} / {r['first_loss'][1]:.3f}")
    if "first_call_s" in r:
        notes.append(f"first call (compiles) {r['first_call_s']:.1f} s")
    if "scan" in r:
        notes.append(f"with `scan_layers`: first call {r['scan'][0]:.1f} s, {r['scan'][1]:.1f} {r['unit']}")
    return notes


def markdown(result: dict) -> str:
    p = result["peak"]
    where = p.get("card", f"{result['cpus']} CPUs")
    lines = [f"Suite `{result['suite']}`, {result['dtype']}: {result['machine']} ({where}), {result['date']}, jax "
             f"{result['jax']}, torch {result['torch']}, Python {result['python']}, load average "
             f"{result['load'][0]:.2f}. Probes: {result['dtype']} matmul {p['matmul_n']}³ "
             f"{1e3 * p['matmul_tflops_jax']:.0f} GFLOP/s (jax) / {1e3 * p['matmul_tflops_torch']:.0f} (torch); copy "
             f"bandwidth {p['bandwidth_gbs']:.1f} GB/s.", "",
             "| work | ours | HF peer | ours/HF | limit | notes |", "|---|---|---|---|---|---|"]
    peak_flops = 1e12 * max(p["matmul_tflops_jax"], p["matmul_tflops_torch"])
    for r in result["rows"]:
        if "flops" in r:  # the best measured matmul rate over the work's multiply-adds
            limit = f"{peak_flops / r['flops']:.0f} {r['unit']} (FLOP/s); ours at {r['ours'] * r['flops'] / peak_flops:.0%}"
        elif "limit" in r:
            limit = f"{r['limit']:.0f} {r['unit']} (bandwidth); ours at {r['ours'] / r['limit']:.0%}"
        else:
            limit = ""
        peer, ratio = ("—", "—") if r["peer"] is None else (f"{r['peer']:.1f} {r['unit']}", f"{r['ours'] / r['peer']:.2f}")
        lines.append(f"| {r['work']} | {r['ours']:.1f} {r['unit']} | {peer} | {ratio} | {limit} | "
                     f"{'; '.join(_notes(r))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("cpu", "gpu", "all"), default="cpu")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: checks the suite's code in minutes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROW_GROUPS),
                    help=f"comma-separated row groups to run, of {', '.join(ROW_GROUPS)} (default: all)")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--markdown", default="", help="write the tables here")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    args = ap.parse_args()
    groups = tuple(g.strip() for g in args.rows.split(",") if g.strip())
    unknown = sorted(set(groups) - set(ROW_GROUPS))
    if unknown:
        ap.error(f"--rows: unknown group(s) {', '.join(unknown)}; choose from {', '.join(ROW_GROUPS)}")
    names = ["cpu", "gpu"] if args.suite == "all" else [args.suite]
    if args.child:
        suite = tiny(SUITES[names[0]]) if args.tiny else SUITES[names[0]]
        print(json.dumps(CHILDREN[args.child](suite, args.src)))
        return
    results = []
    for name in names:
        suite = tiny(SUITES[name]) if args.tiny else SUITES[name]
        if suite.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                print(f"bench/run.py: suite {name} needs a CUDA GPU and this machine has none; skipped "
                      "(--tiny runs its rows on toy sizes on the CPU)", file=sys.stderr)
                continue
        results.append(run_suite(suite, ["--suite", name, *(["--tiny"] if args.tiny else [])], args.reps, groups))
        print(markdown(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(markdown(r) for r in results))
    if not results:
        sys.exit(1)


if __name__ == "__main__":
    main()
