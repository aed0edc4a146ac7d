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
