"""The LoRA r16 q/v train step: ours (``train.build_trainer`` stage 2, with and without ``remat=dots``) beside HF +
PEFT + torch AdamW, each side in fresh processes (peak memory is a per-process high-water mark)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np

from common import (LORA, OURS_TRAIN, Context, Suite, attention_flops, in_child, llm_params, our_dtypes,
                    peak_memory_gib, reset_peak_memory, timed, token_ids, torch_dtype)

ORDER = 40  # where the group's rows stand in the table


def rows(ctx: Context) -> list[dict]:
    return lora_rows(ctx.suite, ctx.suite_args, ctx.llm_dir())



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


CHILDREN = {"lora-ours": child_lora_ours, "lora-ours-remat-dots": lambda s, src: child_lora_ours(s, src, "dots"),
            "lora-peer": child_lora_peer}
