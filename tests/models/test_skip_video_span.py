"""``model.lora.skip_video_span``: the LoRA adapters act only after the last video span, in training (the data
pipeline's ``adapter_mask``), in ``generate`` and in the engine. The prefix, a video included, then reads exactly
as the base model reads it."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from g4v_jax.config import EngineConfig, load_config
from g4v_jax.data.packing import collate_packed
from g4v_jax.data.pipeline import DataConfig, batch_spec, collate
from g4v_jax.data.template import Turn, pad_batch, tokenize_conversation
from g4v_jax.inference.engine import Engine, EngineRequest
from g4v_jax.inference.generate import SamplingConfig, generate
from g4v_jax.models.gpt4video import abstract_model, build_model, language_model
from g4v_jax.models.lora import lora_layers
from g4v_jax.weights import assign_params, named_params

ALL = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
T, S = 4, 56


def _model(*overrides, adapters: bool = True):
    cfg = load_config("tiny", [f"model.lora.targets={ALL}", *overrides]).model
    model = build_model(cfg, seed=0)
    if adapters:  # B != 0: the adapters change every output they touch
        rng = np.random.default_rng(1)
        for layer in lora_layers(model):
            for p in (layer.lora_a, layer.lora_b):
                p[...] = 0.05 * rng.normal(size=p.shape).astype(np.float32)
    return model


def _base_of(model):
    """The same base weights without adapters."""
    cfg = load_config("tiny", ["model.lora.enabled=false"]).model
    params = {k: v for k, v in named_params(model).items() if "lora_" not in k}
    return assign_params(abstract_model(cfg), params)


@nnx.jit
def _logits(model, ids, videos, frame_mask, adapter_mask):
    return model(ids, videos=videos, frame_mask=frame_mask, adapter_mask=adapter_mask)[0]


def _inputs(model, n_text_before=5, n_text_after=9, seed=0):
    """One row: text, a video's slots and close-tag stand-ins, then text; the adapter mask off up to the close tag."""
    rng = np.random.default_rng(seed)
    k = model.cfg.num_video_tokens
    ids = np.concatenate([rng.integers(3, 500, n_text_before), -np.ones(k, int), rng.integers(3, 500, 2),
                          rng.integers(3, 500, n_text_after)]).astype(np.int32)[None]
    prefix = n_text_before + k + 2
    adapter_mask = (np.arange(ids.shape[1]) >= prefix)[None]
    videos = rng.integers(0, 255, (1, 1, T, S, S, 3), dtype=np.uint8)
    return ids, videos, np.ones((1, 1, T), bool), adapter_mask, prefix


@pytest.mark.parametrize("scan", [False, True])
def test_prefix_reads_as_the_base_model_and_the_rest_uses_the_adapters(scan):
    model = _model("model.lora.skip_video_span=true", f"model.scan_layers={str(scan).lower()}")
    ids, videos, frame_mask, adapter_mask, prefix = _inputs(model)
    masked = np.asarray(_logits(model, ids, videos, frame_mask, adapter_mask))
    base = np.asarray(_logits(_base_of(model), ids, videos, frame_mask, None))
    full = np.asarray(_logits(model, ids, videos, frame_mask, None))
    np.testing.assert_allclose(masked[:, :prefix], base[:, :prefix], atol=1e-5, rtol=1e-5)
    assert np.abs(full[:, :prefix] - base[:, :prefix]).max() > 1e-2  # without the mask the adapters act there
    after = np.abs(masked[:, prefix:] - base[:, prefix:]).max(axis=-1)
    assert (after > 1e-3).all()  # and after the span they act with it
    # an all-True mask is the unmasked model
    np.testing.assert_array_equal(np.asarray(_logits(model, ids, videos, frame_mask, np.ones_like(adapter_mask))),
                                  full)


def test_mask_on_and_b_zero_is_the_base_model():
    model = _model("model.lora.skip_video_span=true", adapters=False)  # fresh adapters: B = 0
    ids, videos, frame_mask, adapter_mask, _ = _inputs(model)
    np.testing.assert_array_equal(np.asarray(_logits(model, ids, videos, frame_mask, adapter_mask)),
                                  np.asarray(_logits(_base_of(model), ids, videos, frame_mask, None)))


def test_only_skip_video_span_models_ask_for_a_mask():
    assert language_model(_model("model.lora.skip_video_span=true", adapters=False)).skip_video_span
    assert not language_model(_model(adapters=False)).skip_video_span
    assert not language_model(_model("model.lora.skip_video_span=true", "model.lora.enabled=false",
                                     adapters=False)).skip_video_span


class _Tok:
    """Ids of space-separated integers: enough for the template's piece encoding."""

    eos_token_id, bos_token_id = 2, 1

    def encode(self, text, add_special_tokens=False):
        return [3 + (sum(map(ord, w)) % 400) for w in text.split()]


def test_pipeline_batches_carry_the_mask_packed_or_not():
    tok = _Tok()
    cfg = DataConfig(seq_len=128, use_videos=False, num_video_tokens=4, system_prompt="", adapter_mask=True)
    convs = [tokenize_conversation(tok, turns, num_video_tokens=4) for turns in (
        (Turn("human", "<video>a red circle grows</video>"), Turn("human", "What colour?"), Turn("ai", "red")),
        (Turn("human", "Make a video"), Turn("ai", "Sure")))]
    assert convs[0].video_prefix > 0 and convs[1].video_prefix == 0
    assert "adapter_mask" in batch_spec(cfg, 2) and "adapter_mask" not in batch_spec(
        DataConfig(seq_len=64, use_videos=False), 2)

    from g4v_jax.data.pipeline import _Row

    rows = []
    for i, c in enumerate(convs):
        p = pad_batch([c], 0, length=128)
        rows.append(_Row(i, str(i), p["input_ids"][0], p["labels"][0], p["attention_mask"][0], p["positions"][0],
                         p["adapter_mask"][0], np.zeros(128, bool), np.zeros((0, 4, 8, 8, 3), np.uint8),
                         np.zeros((0, 4), bool)))
    plain = collate(rows, cfg)
    packed = collate_packed([rows], cfg, pad_id=0)
    n0, n1 = len(convs[0]), len(convs[1])
    for batch, starts in ((plain, [(0, 0), (1, 0)]), (packed, [(0, 0), (0, n0)])):
        for (row, start), conv in zip(starts, convs):
            got = batch["adapter_mask"][row, start:start + len(conv)]
            np.testing.assert_array_equal(got, np.arange(len(conv)) >= conv.video_prefix)
    assert not packed["adapter_mask"][0, n0 + n1:].any()


def test_engine_and_generate_skip_the_video_span():
    model = _model("model.lora.skip_video_span=true")
    ids, videos, frame_mask, adapter_mask, prefix = _inputs(model, n_text_after=6)
    sampling = SamplingConfig(8)
    # generate: a left-padded row whose adapter mask comes from pad_batch's rule
    length = 64
    pad = length - ids.shape[1]
    batch = {"input_ids": np.concatenate([np.zeros((1, pad), np.int32), ids], 1),
             "attention_mask": np.arange(length)[None] >= pad,
             "adapter_mask": np.arange(length)[None] >= pad + prefix, "videos": videos, "frame_mask": frame_mask}
    ref = generate(model, batch, sampling, eos_id=-1)
    ref_tokens = ref.tokens[0, :ref.lengths[0]].tolist()
    # the first token is the argmax of the masked full forward pass
    assert ref_tokens[0] == int(np.argmax(np.asarray(_logits(model, ids, videos, frame_mask, adapter_mask))[0, -1]))
    engine = Engine(model, None, EngineConfig(num_slots=2, max_length=128, min_bucket=16),
                    eos_id=-1)
    clip = (videos[0, 0], frame_mask[0, 0])
    skipping = engine.submit(EngineRequest(ids[0], [clip], sampling, video_prefix=prefix))
    everywhere = engine.submit(EngineRequest(ids[0], [clip], sampling))
    engine.run()
    assert skipping.result().tokens == ref_tokens
    batch.pop("adapter_mask")  # generate without a mask: the adapters act everywhere, as video_prefix=0 does
    unmasked = generate(model, batch, sampling, eos_id=-1)
    assert everywhere.result().tokens == unmasked.tokens[0, :unmasked.lengths[0]].tolist()
