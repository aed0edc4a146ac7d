"""BLIP-2's Q-Former (HF ``Blip2QFormerModel``, or the one inside a ``Blip2Model`` / ``Blip2ForConditionalGeneration``)
-> the weights of our ``qformer`` abstractor (``g4v_jax.models.qformer``).

Used by ``convert.assemble --abstractor qformer --qformer-from SRC``: the Q-Former starts from BLIP-2's pretrained
one, as Video-LLaMA and InstructBLIP do, instead of from random weights. From a whole BLIP-2 checkpoint the learned
queries (``query_tokens``) come too, and the ``language_projection`` when its output width is the LLM's; the vision
tower and the language model in it are not read. A standalone ``Blip2QFormerModel`` has neither: the queries and the
projection stay freshly initialised.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

import numpy as np

from g4v_jax.convert.common import (Rule, convert_checkpoint, layernorm, linear, open_checkpoint, read_hf_config,
                                    reshaped)
from g4v_jax.config import AbstractorConfig

BLIP2_IGNORE = (r"^vision_model\.", r"^language_model\.", r"position_ids$", r"^qformer\.embeddings\.",
                r"\.intermediate\.", r"\.output\.dense\.", r"\.output\.LayerNorm\.")


def _attention(ours: str, theirs: str) -> list[Rule]:
    return [*linear(f"{ours}.query", f"{theirs}.attention.query"), *linear(f"{ours}.key", f"{theirs}.attention.key"),
            *linear(f"{ours}.value", f"{theirs}.attention.value"), *linear(f"{ours}.dense", f"{theirs}.output.dense"),
            *layernorm(f"{ours}.norm", f"{theirs}.output.LayerNorm")]


def qformer_rules(prefix: str) -> list[Rule]:
    """Our ``abstractor.*`` names <-> HF's; ``prefix`` is ``"qformer."`` inside a Blip2Model, ``""`` standalone."""
    ours, theirs = "abstractor.layers.{i}", f"{prefix}encoder.layer.{{i}}"
    return [
        *layernorm("abstractor.layernorm", f"{prefix}layernorm"),
        *_attention(f"{ours}.attention", f"{theirs}.attention"),
        *_attention(f"{ours}.crossattention", f"{theirs}.crossattention"),
        *linear(f"{ours}.intermediate", f"{theirs}.intermediate_query.dense"),
        *linear(f"{ours}.output", f"{theirs}.output_query.dense"),
        *layernorm(f"{ours}.output_norm", f"{theirs}.output_query.LayerNorm"),
        reshaped("abstractor.query_tokens", "query_tokens", lambda a: a.shape[1:], lambda a: (1, *a.shape)),
        *linear("abstractor.proj", "language_projection"),
    ]


def qformer_config(hf: Mapping, base: AbstractorConfig, vision_width: int) -> AbstractorConfig:
    """``base`` with the Q-Former's sizes from an HF ``config.json`` (a Blip2Config or a Blip2QFormerConfig)."""
    q = hf.get("qformer_config", hf)
    where = "qformer_config" if "qformer_config" in hf else "config"
    if q.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{where}.hidden_act is {q['hidden_act']!r}; our Q-Former has BLIP-2's exact gelu")
    if q.get("encoder_hidden_size", 1408) != vision_width:
        raise ValueError(f"{where}.encoder_hidden_size ({q.get('encoder_hidden_size', 1408)}) differs from the vision "
                         f"tower's width ({vision_width}): its cross-attention could not read this tower")
    fields = dict(variant="qformer", hidden_size=q.get("hidden_size", 768), num_layers=q.get("num_hidden_layers", 12),
                  num_heads=q.get("num_attention_heads", 12), intermediate_size=q.get("intermediate_size", 3072),
                  norm_eps=q.get("layer_norm_eps", 1e-12),
                  cross_attention_frequency=q.get("cross_attention_frequency", 2))
    if "num_query_tokens" in hf:
        fields["num_query_tokens"] = hf["num_query_tokens"]
    return dataclasses.replace(base, **fields)


def load_hf_qformer(src: str | Path, shapes: Mapping[str, tuple[int, ...]], *, progress: bool = False
                    ) -> dict[str, np.ndarray]:
    """The weights of ``src`` for a ``qformer`` abstractor whose parameters have ``shapes`` ({"abstractor.*": shape}):
    {name: array} for every one the checkpoint has (the queries and the projection only from a whole BLIP-2, the
    projection only when its width fits). A mismatch names the checkpoint's keys and shapes."""
    tensors = open_checkpoint(src)
    prefix = "qformer." if any(k.startswith("qformer.") for k in tensors) else ""
    wanted = dict(shapes)
    ignore = list(BLIP2_IGNORE)
    if "query_tokens" not in tensors:
        wanted.pop("abstractor.query_tokens", None)
    proj = tensors.get("language_projection.weight")
    if proj is None or tuple(np.shape(proj))[0] != wanted.get("abstractor.proj.kernel", (0, 0))[1]:
        wanted = {k: v for k, v in wanted.items() if not k.startswith("abstractor.proj.")}
        ignore.append(r"^language_projection\.")
    wanted = {k: v for k, v in wanted.items() if not k.startswith("abstractor.frame_embedding")}
    return convert_checkpoint(tensors, qformer_rules(prefix), wanted, source=str(src), ignore=ignore,
                              progress=progress)


def read_qformer_config(src: str | Path, base: AbstractorConfig, vision_width: int) -> AbstractorConfig:
    return qformer_config(read_hf_config(src), base, vision_width)
