"""Video abstractor invariances (paper variant, eqs. 1-3) and the video encoder end to end on tiny configs."""

import jax
import numpy as np
import pytest
from flax import nnx

from g4v_jax.config import load_config
from g4v_jax.models.abstractor import VideoAbstractor
from g4v_jax.models.gpt4video import build_model


def _abstractor(overrides=(), seed=0):
    cfg = load_config("tiny", ["model.abstractor.variant=paper", "model.abstractor.num_query_tokens=64",
                               "model.abstractor.num_temporal_tokens=64", *overrides]).model
    return cfg, VideoAbstractor(cfg.abstractor, cfg.llm_hidden_size, rngs=nnx.Rngs(params=seed))


def _sharpen_attention(abstractor, factor=30.0):
    """Fresh weights give near-uniform attention, i.e. a mean over all keys, which hides frame order. Trained
    abstractors attend selectively; scaling the query/key kernels makes the random one do so too."""
    for layer in abstractor.layers:
        for lin in (layer.attention.query, layer.attention.key):
            lin.kernel[...] = lin.kernel[...] * factor


def _features(rng, b=2, t=4, n=17, d=32):
    return rng.normal(size=(b, t, n, d)).astype(np.float32)


def test_paper_output_shape(rng):
    cfg, ab = _abstractor()
    out = ab(_features(rng))
    assert out.shape == (2, 64, cfg.llm_hidden_size)
    assert ab.num_output_tokens == 64 == cfg.num_video_tokens


def test_batch_elements_are_independent(rng):
    _, ab = _abstractor()
    x = _features(rng, b=3)
    both = np.asarray(ab(x))
    for i in range(3):
        np.testing.assert_allclose(both[i], np.asarray(ab(x[i:i + 1]))[0], atol=1e-5)


def test_masking_a_padded_frame_equals_dropping_it(rng):
    _, ab = _abstractor(["model.abstractor.frame_embeddings=4"])
    x = _features(rng, b=1, t=4)
    padded = x.copy()
    padded[:, 3] = 123.0  # whatever a padded frame holds must not matter
    masked = ab(padded, np.array([[True, True, True, False]]))
    dropped = ab(x[:, :3])
    np.testing.assert_allclose(np.asarray(masked), np.asarray(dropped), atol=1e-5)


def test_frame_order_matters_with_frame_embeddings(rng):
    _, ab = _abstractor(["model.abstractor.frame_embeddings=4"])
    _sharpen_attention(ab)
    x = _features(rng, b=1)
    perm = x[:, ::-1]
    # fp32 noise is ~1e-6; the order-blind case below stays under 1e-5
    assert np.abs(np.asarray(ab(x)) - np.asarray(ab(perm))).max() > 1e-4


def test_eqs_1_3_alone_are_blind_to_frame_order(rng):
    """Documented property: without frame embeddings or a temporal vision tower, attention over [F_v; Q] is a set
    operation, so permuting frames leaves the tokens unchanged. This is why the configs add frame order elsewhere."""
    _, ab = _abstractor(["model.abstractor.frame_embeddings=0"])
    _sharpen_attention(ab)
    x = _features(rng, b=1)
    np.testing.assert_allclose(np.asarray(ab(x)), np.asarray(ab(x[:, ::-1])), atol=1e-5)


def test_frame_order_matters_through_the_temporal_adapter(rng):
    cfg = load_config("tiny", ["model.abstractor.variant=paper"]).model
    model = build_model(cfg, seed=1)
    # a trained adapter is non-zero; a fresh one is zero-initialised (identity) by design
    for layer in model.vision_model.layers:
        ad = layer.temporal
        for p in (ad.up_proj.kernel, ad.down_proj.kernel, ad.conv_kernel):
            p[...] = 0.3 * rng.normal(size=p.shape).astype(np.float32)
    _sharpen_attention(model.abstractor)
    frames = rng.integers(0, 256, (1, 4, 56, 56, 3), dtype=np.uint8)
    reversed_frames = np.asarray(model.encode_videos(frames[:, ::-1]))
    assert np.abs(np.asarray(model.encode_videos(frames)) - reversed_frames).max() > 1e-4  # fp32 noise ~1e-6


def test_shared_vs_separate_stream_weights(rng):
    _, shared = _abstractor(["model.abstractor.share_stream_weights=true"])
    _, separate = _abstractor(["model.abstractor.share_stream_weights=false"])
    count = lambda m: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.split(m)[1]))
    layer_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.split(shared.layers)[1]))
    assert count(separate) - count(shared) == layer_params
    # with shared weights the streams differ only by their tokens: equal tokens give F_s == F_t
    shared.temporal_query_tokens[...] = shared.query_tokens[...]
    x = _features(rng, b=1)
    f_s = np.asarray(shared.layers[0](shared.query_tokens[...][None], x.reshape(1, -1, 32), None))
    f_t = np.asarray(shared.layers[0](shared.temporal_query_tokens[...][None], x.reshape(1, -1, 32), None))
    np.testing.assert_array_equal(f_s, f_t)


def test_mplug_variant_tokens_and_single_frame(rng):
    cfg = load_config("tiny").model
    model = build_model(cfg)
    frames = rng.integers(0, 256, (2, 4, 56, 56, 3), dtype=np.uint8)
    out = model.encode_videos(frames, np.ones((2, 4), bool))
    assert out.shape == (2, cfg.abstractor.num_query_tokens + 1, cfg.llm_hidden_size)
    # the last token is the learned vit_eos, identical for every video
    np.testing.assert_allclose(np.asarray(out[:, -1]), np.broadcast_to(np.asarray(model.abstractor.vit_eos[...]),
                                                                       (2, cfg.llm_hidden_size)))
    assert model.encode_videos(frames[:, :1]).shape == out.shape  # T == 1: no temporal queries, same token count


def test_too_many_frames_for_frame_embeddings(rng):
    _, ab = _abstractor(["model.abstractor.frame_embeddings=2"])
    with pytest.raises(ValueError, match="only 2 frame embeddings"):
        ab(_features(rng, t=3))


# ----------------------------------------------------------------------------------------------------------------------
# the paper's Table 5 variants (model.abstractor.variant; convert/hf_blip2's test checks the Q-Former against HF)
# ----------------------------------------------------------------------------------------------------------------------


def _video_encoder(overrides, seed=0):
    cfg = load_config("tiny", ["model.kind=video_encoder", *overrides]).model
    return cfg, build_model(cfg, seed=seed)


def test_without_temporal_tokens_the_paper_variant_is_one_stream(rng):
    """Table 5 #1: no Qt; F_video = W · LN(F_s) + b, the same as the two-stream module with F_t taken away."""
    cfg, ab = _abstractor(["model.abstractor.num_temporal_tokens=0"])
    assert ab.temporal_query_tokens is None and ab.temporal_layers is None
    x = _features(rng)
    out = np.asarray(ab(x))
    qs = np.broadcast_to(np.asarray(ab.query_tokens[...]), (2, 64, 32))
    visual = x.reshape(2, -1, 32)
    f = qs
    for layer in ab.layers:
        f = layer(f, visual, None)
    np.testing.assert_allclose(out, np.asarray(ab.proj(ab.out_norm(f))), atol=1e-5)
    assert out.shape == (2, 64, cfg.llm_hidden_size)


def test_mplug_without_temporal_tokens_takes_the_single_image_path(rng):
    """mPLUG-Owl's code runs without temporal queries exactly as for one frame: visual_fc(queries) + vit_eos."""
    _, none = _video_encoder(["model.abstractor.num_temporal_tokens=0"], seed=3)
    _, full = _video_encoder([], seed=3)
    assert none.abstractor.temporal_visual_fc is None and none.abstractor.temporal_query_tokens is None
    x = rng.normal(size=(1, 4, 17, 32)).astype(np.float32)
    without = np.asarray(none.abstractor(x))
    # the same weights with temporal queries, run on one frame, take the same path
    for name in ("query_tokens", "vit_eos"):
        getattr(full.abstractor, name)[...] = getattr(none.abstractor, name)[...]
    nnx.update(full.abstractor.layers, nnx.state(none.abstractor.layers))
    nnx.update(full.abstractor.visual_fc, nnx.state(none.abstractor.visual_fc))
    assert without.shape == (1, none.cfg.num_video_tokens, 64)
    x1 = x[:, :1]
    np.testing.assert_allclose(np.asarray(none.abstractor(x1)), np.asarray(full.abstractor(x1)), atol=1e-5)
    assert np.abs(np.asarray(full.abstractor(x)) - without).max() > 1e-3  # with 4 frames, Qt changes the tokens


def _st_pool_numpy(features, mask, slots):
    """Video-ChatGPT's get_spatio_temporal_features for one video, written out: CLS dropped, the temporal tokens
    (mean over patches) zero-padded to ``slots``, then the spatial tokens (mean over the video's frames)."""
    patches = features[mask, 1:]  # the video's own frames (T', P, D)
    temporal = patches.mean(axis=1)
    temporal = np.concatenate([temporal, np.zeros((slots - len(temporal), temporal.shape[1]))])
    return np.concatenate([temporal, patches.mean(axis=0)])


def test_st_pool_is_video_chatgpts_pooling(rng):
    cfg, enc = _video_encoder(["model.abstractor.variant=st_pool", "model.abstractor.pool_frames=6"])
    ab = enc.abstractor
    assert cfg.num_video_tokens == ab.num_output_tokens == 6 + cfg.vision.num_patches
    x = rng.normal(size=(2, 4, 1 + cfg.vision.num_patches, 32)).astype(np.float32)
    mask = np.array([[True, True, True, True], [True, True, False, False]])
    x[1, 2:] = 1e3  # padded frames hold anything
    out = np.asarray(ab(x, mask))
    kernel, bias = np.asarray(ab.proj.kernel[...]), np.asarray(ab.proj.bias[...])
    for i in range(2):
        np.testing.assert_allclose(out[i], _st_pool_numpy(x[i], mask[i], 6) @ kernel + bias, atol=1e-4)
    # any T up to the slots, and a masked frame equals a dropped one
    np.testing.assert_allclose(np.asarray(ab(x[1:, :2]))[0], out[1], atol=1e-4)
    with pytest.raises(ValueError, match="7 frames but st_pool has 6 temporal token slots"):
        ab(rng.normal(size=(1, 7, 1 + cfg.vision.num_patches, 32)).astype(np.float32))


@pytest.mark.parametrize("variant", ["paper", "mplug_owl_video", "qformer", "st_pool"])
def test_every_variant_fills_the_prompts_video_slots(variant, rng):
    """GPT4Video end to end for each variant: the token count comes from the config, the prompt's slots follow it,
    every parameter has logical axes, stage 1 trains the whole abstractor, and a masked frame equals a dropped one."""
    from g4v_jax.train.step import trainable_filter

    cfg = load_config("tiny", [f"model.abstractor.variant={variant}", "model.abstractor.num_query_tokens=8",
                               "model.abstractor.num_temporal_tokens=8"]).model
    model = build_model(cfg)
    k = cfg.num_video_tokens
    assert model.abstractor.num_output_tokens == k
    for path, var in nnx.to_flat_state(nnx.state(model.abstractor, nnx.Param)):
        assert len(var.get_metadata()["logical_axes"]) == var.get_value().ndim, path
    dotted = lambda state, prefix="": {prefix + ".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}
    trainable, _ = nnx.state(model, trainable_filter("stage1", "gpt4video", False), ...)
    assert dotted(trainable) == dotted(nnx.state(model.abstractor, nnx.Param), "abstractor.")
    ids = np.array([[1, 5, *[-1] * k, 6, 7]])
    frames = rng.integers(0, 256, (1, 1, 4, 56, 56, 3), dtype=np.uint8)
    mask = np.array([[[True, True, True, False]]])
    logits, _ = model(ids, videos=frames, frame_mask=mask)
    assert logits.shape == (1, k + 4, cfg.llm.vocab_size)
    dropped, _ = model(ids, videos=frames[:, :, :3], frame_mask=mask[:, :, :3])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(dropped), atol=1e-4)
    with pytest.raises(ValueError, match="whole videos"):
        model(np.array([[1, *[-1] * (k + 1), 2]]), videos=frames, frame_mask=mask)
