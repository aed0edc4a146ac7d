"""Our LLaMA (with LoRA) -> Hugging Face: a merged ``LlamaForCausalLM`` checkpoint and a PEFT LoRA adapter.

    python -m convert.export_hf SRC DST [--merged-only | --adapter-only] [--with-base] [--base-model NAME]
                                        [key=value ...]

SRC is one of our model directories: ``kind: llm`` (``g4v_jax.load`` returns the ``LlamaForCausalLM``) or
``kind: gpt4video`` (its ``.language_model`` is exported; the vision tower and abstractor have no HF counterpart and are
left out). ``key=value`` overrides apply to SRC's config when it is loaded (``model.param_dtype=bfloat16`` exports bf16
weights). DST receives:

``DST/merged/``  an HF ``LlamaForCausalLM`` directory with every adapter folded in (W + A B · alpha/r), loadable with
    ``transformers.LlamaForCausalLM.from_pretrained``: ``config.json`` (all of our ``LlamaConfig``; RoPE written both
    the transformers-4 way, ``rope_theta`` + ``rope_scaling``, and the transformers-5 way, ``rope_parameters``, and the
    dtype as both ``torch_dtype`` and ``dtype``, so either major version reads it) and one ``model.safetensors`` with
    HF's names (``convert.hf_llama.export_llama``: kernels (in, out) become torch ``weight`` (out, in)).
``DST/adapter/``  the adapters as a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) for
    ``peft.PeftModel.from_pretrained(base, DST/adapter)``, where ``base`` is the HF LLaMA the model was converted from
    (or ``DST/base`` with ``--with-base``). PEFT's names, checked against a real ``PeftModel.save_pretrained`` (peft
    0.21): ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` (r, in) = our ``lora_a``.T and
    ``...lora_B.weight`` (out, r) = our ``lora_b``.T; ``base_model.model`` is PEFT's ``PeftModelForCausalLM`` ->
    ``LoraModel`` wrapping, the rest HF's module path. r, lora_alpha (= our scaling · r), dropout and target_modules
    come from the model itself, so the adapter reproduces our forward exactly (PEFT scales by lora_alpha / r, as we do).
``DST/base/``  (``--with-base`` only) the base weights without the adapters, same layout as ``merged``.

The merged kernels are computed from the named parameters in float64 and rounded once to the kernel's dtype; the
loaded model is never mutated, and a model whose layers are already ``lora.merge``d is handled (its kernels already
hold the adapters: ``merged`` writes them as they are, ``base`` subtracts the adapters).

Weights are written with ``g4v_jax.weights.write_safetensors`` (metadata ``format: pt``, which transformers checks):
export needs neither torch nor the ``safetensors`` package, and bf16 goes out as bf16. One unsharded file is written
(HF reads any size; ``save_pretrained`` from HF reshards it if wanted). The CLI copies the tokenizer files that SRC
holds (our converters copy them from the HF checkpoint) into ``merged`` and ``base``.

``load_peft_adapter(model, adapter_dir)`` is the inverse of the adapter export: it reads a PEFT LoRA adapter (ours,
or one trained with PEFT on an HF LLaMA, also when the LLaMA sat inside another model, e.g. ``language_model.`` in
mPLUG-Owl) into a model's LoRA parameters, after checking that r, lora_alpha / r and target_modules match the model.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Mapping

import numpy as np
from flax import nnx

import g4v_jax
from g4v_jax.cli import guard
from g4v_jax.config import LlamaConfig
from g4v_jax.convert.common import Rule, TorchBinTensors, convert_checkpoint, export_params
from g4v_jax.convert.hf_llama import export_llama
from g4v_jax.data.tokenizer import copy_tokenizer_files
from g4v_jax.models.gpt4video import language_model
from g4v_jax.models.llama import LlamaForCausalLM
from g4v_jax.models.lora import LoRALinear
from g4v_jax.weights import named_params, read_safetensors, write_safetensors

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION + MLP
PEFT_PREFIX = "base_model.model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (LlamaForCausalLM).model
HF_WEIGHTS = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ST_METADATA = {"format": "pt"}  # transformers refuses safetensors files without a known format


# ----------------------------------------------------------------------------------------------------------------------
# the LLaMA inside a model, and its LoRA layers
# ----------------------------------------------------------------------------------------------------------------------


def _module(target: str) -> str:
    return "self_attn" if target in ATTENTION else "mlp"


def _lora_modules(lm: LlamaForCausalLM) -> dict[str, LoRALinear]:
    """Dotted path (``layers.0.self_attn.q_proj``) -> LoRA layer, for every projection that has an adapter."""
    if lm.scan_layers:
        raise ValueError("the model's layers are scanned (model.scan_layers=true): export reads them per layer, so "
                         "load it with g4v_jax.load(dir, ['model.scan_layers=false']) (the same weights)")
    return {".".join(map(str, path)): m for path, m in nnx.iter_graph(lm)
            if isinstance(m, LoRALinear) and m.lora_a is not None}


def lora_settings(lm: LlamaForCausalLM) -> dict:
    """r, lora_alpha, dropout and targets of a model's adapters, read from the model (the same in every layer)."""
    layers = _lora_modules(lm)
    if not layers:
        raise ValueError("the model has no LoRA adapters (model.lora.enabled is false): there is no adapter to export")
    seen = {(int(m.lora_a.get_value().shape[1]), float(m.scaling),
             0.0 if m.dropout is None else float(m.dropout.rate)) for m in layers.values()}
    if len(seen) != 1:
        raise ValueError(f"adapters differ between layers (rank, scaling, dropout): {sorted(seen)}")
    (rank, scaling, dropout), = seen
    by_layer: dict[str, set[str]] = {}
    for path in layers:
        i, name = path.split(".")[1], path.split(".")[-1]
        by_layer.setdefault(i, set()).add(name)
    target_sets = {frozenset(s) for s in by_layer.values()}
    if len(target_sets) != 1 or len(by_layer) != lm.cfg.num_layers:
        raise ValueError(f"adapters are not on the same projections in every layer: {by_layer}")
    targets = [t for t in TARGETS if t in next(iter(target_sets))]
    alpha = scaling * rank
    return dict(r=rank, lora_alpha=int(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else alpha,
                lora_dropout=dropout, target_modules=targets)


# ----------------------------------------------------------------------------------------------------------------------
# merged / base HF checkpoint
# ----------------------------------------------------------------------------------------------------------------------


def hf_llama_config(cfg: LlamaConfig, dtype: str = "float32") -> dict:
    """An HF ``config.json`` for ``LlamaForCausalLM`` (readable by transformers 4 and 5)."""
    rs = cfg.rope_scaling
    if rs.rope_type == "default":
        scaling = None
    elif rs.rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": rs.factor}
    elif rs.rope_type == "llama3":
        scaling = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                   "high_freq_factor": rs.high_freq_factor,
                   "original_max_position_embeddings": rs.original_max_position_embeddings}
    else:  # RopeScaling validates rope_type; a new type needs its HF fields here
        raise ValueError(f"rope_type {rs.rope_type!r} has no HF export")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": rs.rope_type, "rope_theta": cfg.rope_theta, **(scaling or {})},
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def llm_arrays(model: nnx.Module, *, merge: bool = True) -> dict[str, np.ndarray]:
    """The LLaMA's base parameters by our names (no ``lora_`` entries), with every adapter folded into its kernel
    (``merge=True``) or not. Computed in float64 and rounded once to the kernel's dtype; ``model`` is not changed."""
    lm = language_model(model)
    arrays = {k: np.asarray(v) for k, v in named_params(lm).items() if ".lora_" not in k}
    for path, layer in _lora_modules(lm).items():
        sign = int(merge) - int(layer.merged)  # +1 add the adapter, -1 take it out of a merged kernel, 0 as is
        if sign:
            w = arrays[f"{path}.kernel"]
            a = np.asarray(layer.lora_a[...]).astype(np.float64)
            b = np.asarray(layer.lora_b[...]).astype(np.float64)
            arrays[f"{path}.kernel"] = (w.astype(np.float64) + sign * layer.scaling * (a @ b)).astype(w.dtype)
    return arrays


def export_merged_hf(model: nnx.Module, dst: str | Path, *, merge: bool = True) -> Path:
    """Write the LLaMA of ``model`` with its adapters merged (``merge=False``: without them) as an HF
    ``LlamaForCausalLM`` directory (``config.json`` + ``model.safetensors``). Returns ``dst``."""
    lm = language_model(model)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = export_llama(llm_arrays(lm, merge=merge), tied=lm.cfg.tie_word_embeddings)
    dtype = str(np.dtype(tensors["model.embed_tokens.weight"].dtype))
    (dst / "config.json").write_text(json.dumps(hf_llama_config(lm.cfg, dtype), indent=2) + "\n")
    write_safetensors(dst / HF_WEIGHTS, tensors, metadata=_ST_METADATA)
    return dst


# ----------------------------------------------------------------------------------------------------------------------
# PEFT adapter
# ----------------------------------------------------------------------------------------------------------------------


def _transpose(x):
    return (x.T,)


def peft_rules(targets, prefix: str = PEFT_PREFIX) -> list[Rule]:
    """Our ``layers.{i}.<module>.<target>.lora_a/b`` (in, r) / (r, out) <-> PEFT's ``lora_A/B.weight`` (r, in) /
    (out, r), under ``prefix``."""
    rules = []
    for t in targets:
        ours, theirs = f"layers.{{i}}.{_module(t)}.{t}", f"{prefix}layers.{{i}}.{_module(t)}.{t}"
        rules += [Rule((f"{ours}.lora_a",), (f"{theirs}.lora_A.weight",), _transpose, _transpose),
                  Rule((f"{ours}.lora_b",), (f"{theirs}.lora_B.weight",), _transpose, _transpose)]
    return rules


def peft_adapter_config(settings: Mapping, base_model_name_or_path: str = "") -> dict:
    """``adapter_config.json`` for a plain LoRA adapter as peft 0.21's ``LoraConfig`` writes it (the fields that
    matter; PEFT fills the rest with defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": settings["r"],
        "lora_alpha": settings["lora_alpha"],
        "lora_dropout": settings["lora_dropout"],
        "target_modules": list(settings["target_modules"]),
        "exclude_modules": None,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def export_peft_adapter(model: nnx.Module, dst: str | Path, base_model_name_or_path: str = "") -> Path:
    """Write the LLaMA adapters of ``model`` as a PEFT LoRA adapter directory. Returns ``dst``."""
    lm = language_model(model)
    settings = lora_settings(lm)
    lora = {k: np.asarray(v) for k, v in named_params(lm).items() if ".lora_" in k}
    tensors = export_params(lora, peft_rules(settings["target_modules"]))
    if len(tensors) != len(lora):  # every adapter matrix must have a name in the adapter file
        raise AssertionError(f"exported {len(tensors)} of {len(lora)} adapter matrices")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / ADAPTER_CONFIG).write_text(json.dumps(peft_adapter_config(settings, base_model_name_or_path),
                                                 indent=2) + "\n")
    write_safetensors(dst / ADAPTER_WEIGHTS, tensors, metadata=_ST_METADATA)
    return dst


def _peft_targets(target_modules) -> set[str]:
    """PEFT's ``target_modules`` (a list of module names, a regex matched against the full module path, or
    ``all-linear``) as the set of LLaMA projections it selects."""
    if target_modules == "all-linear":
        return set(TARGETS)
    if isinstance(target_modules, str):
        return {t for t in TARGETS if re.fullmatch(target_modules, f"model.layers.0.{_module(t)}.{t}")}
    return {t for t in TARGETS if any(t == m or m.endswith(f".{t}") for m in target_modules)}


def _peft_prefix(keys) -> str:
    rx = re.compile(r"^(.*?)layers\.\d+\.(?:self_attn|mlp)\.\w+\.lora_[AB]\.weight$")
    prefixes = {m.group(1) for k in keys if (m := rx.match(k))}
    if len(prefixes) != 1:
        raise ValueError("cannot find the LLaMA layers in the adapter's tensor names "
                         f"(expected '<prefix>layers.<i>.self_attn.q_proj.lora_A.weight'; prefixes found: "
                         f"{sorted(prefixes)}; first keys: {sorted(keys)[:4]})")
    return prefixes.pop()


def load_peft_adapter(model: nnx.Module, adapter_dir: str | Path) -> nnx.Module:
    """Read a PEFT LoRA adapter directory into the LoRA parameters of ``model`` (its LLaMA), in place; returns
    ``model``. The adapter must match the model's LoRA setup: r, lora_alpha / r, target_modules (convert the base
    with ``model.lora.rank=... model.lora.alpha=... model.lora.targets=[...]`` to match), plain LoRA (no DoRA,
    rsLoRA, per-module rank/alpha patterns, biases or modules_to_save)."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory: {ADAPTER_CONFIG} is missing")
    pc = json.loads(cfg_path.read_text())
    lm = language_model(model)
    layers = _lora_modules(lm)
    if not layers:
        raise ValueError("the model has no LoRA adapters (model.lora.enabled is false); convert it with LoRA on")
    if any(m.merged for m in layers.values()):
        raise ValueError("the model's adapters are merged into its kernels; g4v_jax.models.lora.unmerge(model) first")
    ours = lora_settings(lm)

    problems = []
    if pc.get("peft_type") != "LORA":
        problems.append(f"peft_type is {pc.get('peft_type')!r}, only LORA is supported")
    for key, bad in (("use_dora", True), ("use_rslora", True), ("lora_bias", True)):
        if pc.get(key) == bad:
            problems.append(f"{key}={bad} is not supported")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if pc.get(key):
            problems.append(f"{key}={pc[key]!r} is not supported (plain LoRA on every layer only)")
    if pc.get("bias", "none") != "none":
        problems.append(f"bias={pc['bias']!r} is not supported")
    r, alpha = pc.get("r"), pc.get("lora_alpha")
    if r != ours["r"]:
        problems.append(f"adapter r={r} but the model's LoRA rank is {ours['r']} (model.lora.rank={r})")
    elif alpha is None or abs(alpha / r - ours["lora_alpha"] / ours["r"]) > 1e-6 * abs(alpha / r):
        problems.append(f"adapter lora_alpha={alpha} (scaling {alpha}/{r}) but the model's scaling is "
                        f"{ours['lora_alpha']}/{ours['r']} (model.lora.alpha={alpha})")
    theirs_targets = _peft_targets(pc.get("target_modules") or [])
    if theirs_targets != set(ours["target_modules"]):
        problems.append(f"adapter target_modules={pc.get('target_modules')!r} ({sorted(theirs_targets)}) but the "
                        f"model has adapters on {ours['target_modules']} (model.lora.targets=[...])")
    if problems:
        raise ValueError(f"PEFT adapter {adapter_dir} does not match the model:\n  " + "\n  ".join(problems))

    if (adapter_dir / ADAPTER_WEIGHTS).is_file():
        tensors = read_safetensors(adapter_dir / ADAPTER_WEIGHTS)
        source = adapter_dir / ADAPTER_WEIGHTS
    elif (adapter_dir / "adapter_model.bin").is_file():
        source = adapter_dir / "adapter_model.bin"
        tensors = TorchBinTensors(source)
    else:
        raise FileNotFoundError(f"{adapter_dir}: neither {ADAPTER_WEIGHTS} nor adapter_model.bin found")
    shapes = {f"{path}.{n}": tuple(getattr(m, n).get_value().shape)
              for path, m in layers.items() for n in ("lora_a", "lora_b")}
    arrays = convert_checkpoint(tensors, peft_rules(ours["target_modules"], _peft_prefix(list(tensors))), shapes,
                                source=str(source), progress=False)
    for path, layer in layers.items():
        layer.lora_a[...] = np.asarray(arrays[f"{path}.lora_a"], np.float32)  # cast/sharding kept by the variable
        layer.lora_b[...] = np.asarray(arrays[f"{path}.lora_b"], np.float32)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


@guard("convert.export_hf", errors=(TypeError,))  # a video_encoder directory has no LLM
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m convert.export_hf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="our model directory (kind llm or gpt4video)")
    ap.add_argument("dst", help="output directory: merged/ and adapter/ are written into it")
    ap.add_argument("overrides", nargs="*", help="config overrides for loading SRC, e.g. model.param_dtype=bfloat16")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--merged-only", action="store_true", help="write only DST/merged")
    only.add_argument("--adapter-only", action="store_true", help="write only DST/adapter")
    ap.add_argument("--with-base", action="store_true",
                    help="also write DST/base: the LLaMA without adapters, the base for DST/adapter")
    ap.add_argument("--base-model", default="",
                    help="base_model_name_or_path recorded in adapter_config.json (an HF hub name or path)")
    args = ap.parse_intermixed_args(argv)

    # exported per layer, as HF names them: a model trained with scanned layers loads unrolled (same weights)
    model = g4v_jax.load(args.src, ["model.scan_layers=false", *args.overrides])
    lm = language_model(model)
    dst = Path(args.dst)
    has_lora = bool(_lora_modules(lm))
    written, tokenizer = [], []
    if not args.adapter_only:
        path = export_merged_hf(lm, dst / "merged")
        tokenizer = copy_tokenizer_files(args.src, path)
        what = "LoRA merged" if has_lora else "no LoRA adapters"
        written.append(f"wrote {path} (HF LlamaForCausalLM, {what}). Load it with:\n\n"
                       f"    from transformers import LlamaForCausalLM\n"
                       f"    model = LlamaForCausalLM.from_pretrained({str(path)!r})\n")
    base = args.base_model
    if args.with_base:
        path = export_merged_hf(lm, dst / "base", merge=False)
        tokenizer = copy_tokenizer_files(args.src, path)
        base = base or str(path)
        written.append(f"wrote {path} (HF LlamaForCausalLM without the adapters: the base for the adapter)\n")
    if not args.merged_only:
        if has_lora:
            path = export_peft_adapter(lm, dst / "adapter", args.base_model)
            base_expr = repr(base) if base else "'<the HF LLaMA this model was converted from>'"
            written.append(f"wrote {path} (PEFT LoRA adapter). Load it with:\n\n"
                           f"    from peft import PeftModel; from transformers import LlamaForCausalLM\n"
                           f"    base = LlamaForCausalLM.from_pretrained({base_expr})\n"
                           f"    model = PeftModel.from_pretrained(base, {str(path)!r})\n")
        elif args.adapter_only:
            raise ValueError(f"{args.src}: the model has no LoRA adapters (model.lora.enabled is false); nothing to "
                             "export")
        else:
            written.append("no adapter written: the model has no LoRA adapters\n")
    if not args.adapter_only or args.with_base:
        written.append(f"tokenizer: {', '.join(tokenizer)} copied" if tokenizer else
                       f"no tokenizer files in {args.src}: copy the original LLaMA's tokenizer files beside "
                       "config.json")
    print("\n".join(written))


if __name__ == "__main__":
    main()
