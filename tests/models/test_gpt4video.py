"""GPT4Video forward on tiny configs: video tokens land at their slots, text-only rows and batches, labels, gradients
only for the LoRA adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from g4v_jax.config import load_config
from g4v_jax.data.template import IGNORE_INDEX, Turn, pad_batch, tokenize_conversation
from g4v_jax.data.tokenizer import build_bpe_tokenizer
from g4v_jax.models.gpt4video import build_model
from g4v_jax.models.lora import LoRAParam

CORPUS = ["a red square moves left", "what happens in the video?", "show me a blue circle growing",
          "the circle grows and the square bounces", "<video>a green triangle</video> is what I would show"] * 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = load_config("tiny").model
    tok = build_bpe_tokenizer(CORPUS, tmp_path_factory.mktemp("tok"), vocab_size=cfg.llm.vocab_size)
    model = build_model(cfg, seed=0)
    return cfg, tok, model


def _batch(cfg, tok):
    k = cfg.num_video_tokens
    convs = [
        [Turn("human", video=0), Turn("human", video=1), Turn("human", "what happens in the video?"),
         Turn("ai", "the circle grows and the square bounces")],
        [Turn("human", "show me a blue circle growing"), Turn("ai", "<video>a blue circle growing</video>")],
        [Turn("human", video=0), Turn("human", "what happens in the video?"), Turn("ai", "a red square moves left")],
    ]
    toks = [tokenize_conversation(tok, c, num_video_tokens=k) for c in convs]
    batch = pad_batch(toks, pad_id=tok.pad_token_id)
    # per row: row 0 holds two videos, row 1 none (padding), row 2 one (+ padding)
    frames = np.random.default_rng(0).integers(0, 256, (3, 2, cfg.num_frames, 56, 56, 3), dtype=np.uint8)
    fmask = np.ones((3, 2, cfg.num_frames), bool)
    fmask[1] = False
    fmask[2, 1] = False
    return batch, frames, fmask


def test_video_tokens_land_exactly_at_their_slots(setup):
    cfg, tok, model = setup
    batch, frames, fmask = _batch(cfg, tok)
    ids = batch["input_ids"]
    # jitted: eager NNX compiles every op separately, seconds per new shape on CPU
    embeds = np.asarray(nnx.jit(lambda m, i, f, fm: m.embed(i, f, fm))(model, ids, frames, fmask))
    flat = frames.reshape(6, *frames.shape[2:])
    video_tokens = np.asarray(nnx.jit(lambda m, f, fm: m.encode_videos(f, fm))(model, flat, fmask.reshape(6, -1)))
    video_tokens = video_tokens.reshape(3, 2, *video_tokens.shape[1:])  # (B, V, K, D)
    k = cfg.num_video_tokens
    slots = [np.flatnonzero(row < 0) for row in ids]
    assert [len(s) for s in slots] == [2 * k, 0, k]
    np.testing.assert_array_equal(embeds[0, slots[0][:k]], video_tokens[0, 0])
    np.testing.assert_array_equal(embeds[0, slots[0][k:]], video_tokens[0, 1])
    np.testing.assert_array_equal(embeds[2, slots[2]], video_tokens[2, 0])
    text = np.asarray(model.language_model.embed(np.where(ids < 0, 0, ids)))
    np.testing.assert_array_equal(embeds[ids >= 0], text[ids >= 0])
    logits, _ = nnx.jit(lambda m, i, f, fm, am: m(i, videos=f, frame_mask=fm, attention_mask=am))(
        model, ids, frames, fmask, batch["attention_mask"])
    assert logits.shape == (3, ids.shape[1], cfg.llm.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()


def test_text_only_batch_does_no_vision_work(setup):
    cfg, tok, model = setup
    conv = tokenize_conversation(tok, [Turn("human", "show me a blue circle growing"),
                                       Turn("ai", "<video>a blue circle growing</video>")], num_video_tokens=9)
    batch = pad_batch([conv], pad_id=tok.pad_token_id)
    graphdef, state = nnx.split(model)
    poisoned = jax.tree.map(lambda x: x, state)
    # NaN vision weights cannot reach a forward pass that never runs the vision tower
    for path, var in nnx.to_flat_state(poisoned):
        if path[0] in ("vision_model", "abstractor"):
            var.set_value(jnp.full(var.get_value().shape, jnp.nan, var.get_value().dtype))
    logits, _ = nnx.merge(graphdef, poisoned)(batch["input_ids"], attention_mask=batch["attention_mask"])
    ref, _ = model.language_model(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref))


def test_slot_count_must_match_the_videos(setup):
    cfg, tok, model = setup
    batch, frames, fmask = _batch(cfg, tok)
    with pytest.raises(ValueError, match=r"rows \[\(0, 18\)\] \(row, slots\) do not hold whole videos"):
        model.embed(batch["input_ids"], frames[:, :1], fmask[:, :1])
    with pytest.raises(ValueError, match="videos must have 6 dims \\(batch, videos per row"):
        model.embed(batch["input_ids"], frames[0], fmask[0])
    with pytest.raises(ValueError, match="video slots but no videos"):
        model.embed(batch["input_ids"])


def test_gradients_reach_only_the_lora_adapters(setup):
    cfg, tok, model = setup
    batch, frames, fmask = _batch(cfg, tok)
    labels = batch["labels"]
    assert (labels != IGNORE_INDEX).sum() > 0 and (labels[batch["input_ids"] < 0] == IGNORE_INDEX).all()
    graphdef, lora_state, frozen = nnx.split(model, LoRAParam, ...)

    def loss_fn(lora_state):
        m = nnx.merge(graphdef, lora_state, frozen)
        logits, _ = m(batch["input_ids"], videos=frames, frame_mask=fmask, attention_mask=batch["attention_mask"])
        logp = jax.nn.log_softmax(logits[:, :-1])
        tgt = labels[:, 1:]
        valid = tgt != IGNORE_INDEX
        nll = -jnp.take_along_axis(logp, jnp.where(valid, tgt, 0)[..., None], -1)[..., 0]
        return (nll * valid).sum() / valid.sum()

    grads = jax.jit(jax.grad(loss_fn))(lora_state)
    leaves = nnx.to_flat_state(grads)
    names = {".".join(map(str, p)) for p, _ in leaves}
    assert names and all(".lora_a" in n or ".lora_b" in n for n in names)
    assert all(".language_model." in f".{n}" for n in names)  # nothing of the frozen towers
    # with B = 0 at init, dL/dB carries the signal (dL/dA is zero until B moves)
    b_grads = [np.abs(np.asarray(v.get_value())).max() for p, v in leaves if p[-1] == "lora_b"]
    assert len(b_grads) == 2 * cfg.llm.num_layers and min(b_grads) > 0


def test_model_kind_and_language_model_are_decided_in_one_place():
    import dataclasses

    from g4v_jax.config import load_config
    from g4v_jax.models.gpt4video import abstract_model, language_model, model_kind

    cfg = load_config("tiny").model
    g4v = abstract_model(cfg)
    encoder = abstract_model(dataclasses.replace(cfg, kind="video_encoder"))
    llm = abstract_model(dataclasses.replace(cfg, kind="llm"))
    assert [model_kind(m) for m in (g4v, encoder, llm)] == ["gpt4video", "video_encoder", "llm"]
    assert language_model(g4v) is g4v.language_model and language_model(llm) is llm
    with pytest.raises(TypeError, match="video_encoder model has no language model"):
        language_model(encoder)
    with pytest.raises(TypeError, match="is not a g4v_jax model"):
        model_kind(object())
