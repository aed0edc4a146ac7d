"""BLIP-2's Q-Former: a tiny random transformers Blip2QFormerModel / Blip2ForConditionalGeneration, converted by
convert.hf_blip2, gives our qformer abstractor the same outputs (fp32, <= 1e-4), with frames masked out too."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

import g4v_jax
from g4v_jax.convert.hf_blip2 import load_hf_qformer, qformer_config, read_qformer_config
from g4v_jax.config import AbstractorConfig, ConfigError
from g4v_jax.models.qformer import QFormerAbstractor
from g4v_jax.weights import CheckpointMismatchError, assign_params, named_params, param_shapes

torch = pytest.importorskip("torch")

VISION = 24  # the video features' width (encoder_hidden_size)
QFORMER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
               encoder_hidden_size=VISION, cross_attention_frequency=2)


def _randomise_norms(model):
    """Random LayerNorm affine params, so a scale/bias mix-up cannot hide behind ones and zeros."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))


@pytest.fixture(scope="module")
def hf_qformer(tmp_path_factory):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(0)
    model = Blip2QFormerModel(Blip2QFormerConfig(**QFORMER)).eval()
    _randomise_norms(model)
    path = tmp_path_factory.mktemp("hf_qformer")
    model.save_pretrained(path)
    return path, model


def _ours(src, num_query_tokens=6, llm=20):
    cfg = read_qformer_config(src, AbstractorConfig(num_query_tokens=num_query_tokens), VISION)
    ab = QFormerAbstractor(cfg, VISION, llm, rngs=nnx.Rngs(params=1))
    shapes = {f"abstractor.{k}": s for k, (s, _) in param_shapes(ab).items()}
    params = {f"abstractor.{k}": np.asarray(v) for k, v in named_params(ab).items()}
    params.update(load_hf_qformer(src, shapes))
    return cfg, assign_params(ab, {k.removeprefix("abstractor."): v for k, v in params.items()}, str(src))


def _video(rng, b=2, t=3, n=5):
    return rng.normal(size=(b, t, n, VISION)).astype(np.float32)


def test_qformer_matches_hf_blip2_qformer_model(hf_qformer, rng):
    src, hf = hf_qformer
    cfg, ab = _ours(src)
    assert (cfg.hidden_size, cfg.num_layers, cfg.norm_eps, cfg.cross_attention_frequency) == (32, 3, 1e-12, 2)
    assert [layer.crossattention is not None for layer in ab.layers] == [True, False, True]
    video = _video(rng)
    mask = np.array([[True, True, True], [True, True, False]])
    b, t, n, _ = video.shape
    queries = np.broadcast_to(np.asarray(ab.query_tokens[...]), (b, *ab.query_tokens.shape))
    with torch.no_grad():
        ref = hf(query_embeds=torch.from_numpy(np.ascontiguousarray(queries)),
                 encoder_hidden_states=torch.from_numpy(video.reshape(b, t * n, -1)),
                 encoder_attention_mask=torch.from_numpy(np.repeat(mask, n, axis=1).astype(np.int64))
                 ).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(ab.qformer(video, mask)), ref, atol=1e-4)
    # masking the last frame equals dropping it, whatever it holds
    garbage = video.copy()
    garbage[1, 2] = 50.0
    np.testing.assert_allclose(np.asarray(ab(garbage, mask))[1], np.asarray(ab(video[1:, :2]))[0], atol=1e-4)


def test_a_whole_blip2_brings_its_queries_and_projection(tmp_path, rng):
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                              OPTConfig)

    torch.manual_seed(1)
    cfg = Blip2Config(vision_config=Blip2VisionConfig(hidden_size=VISION, intermediate_size=32, num_hidden_layers=1,
                                                      num_attention_heads=4, image_size=28, patch_size=14).to_dict(),
                      qformer_config=Blip2QFormerConfig(**QFORMER).to_dict(),
                      text_config=OPTConfig(hidden_size=20, ffn_dim=40, num_hidden_layers=1, num_attention_heads=4,
                                            vocab_size=64, word_embed_proj_dim=20).to_dict(),
                      num_query_tokens=7)
    hf = Blip2ForConditionalGeneration(cfg).eval()
    _randomise_norms(hf)
    hf.save_pretrained(tmp_path)
    ours_cfg, ab = _ours(tmp_path, num_query_tokens=1, llm=20)
    assert ours_cfg.num_query_tokens == 7  # from the checkpoint's config
    np.testing.assert_array_equal(np.asarray(ab.query_tokens[...]), hf.query_tokens[0].detach().numpy())
    video = _video(rng, b=1)
    with torch.no_grad():
        features = torch.from_numpy(video.reshape(1, -1, VISION))
        q = hf.qformer(query_embeds=hf.query_tokens, encoder_hidden_states=features)
        ref = hf.language_projection(q.last_hidden_state).numpy()
    np.testing.assert_allclose(np.asarray(ab(video)), ref, atol=1e-4)


def test_a_checkpoint_that_does_not_fit_names_its_keys(hf_qformer):
    src, _ = hf_qformer
    cfg = read_qformer_config(src, AbstractorConfig(), VISION)
    small = QFormerAbstractor(dataclasses.replace(cfg, num_layers=2), VISION, 20, rngs=nnx.Rngs(params=0))
    shapes = {f"abstractor.{k}": s for k, (s, _) in param_shapes(small).items()}
    with pytest.raises(CheckpointMismatchError, match="unexpected keys .*encoder.layer.2"):
        load_hf_qformer(src, shapes)
    with pytest.raises(ValueError, match="encoder_hidden_size \\(24\\) differs from the vision tower's width \\(16\\)"):
        qformer_config({"qformer_config": QFORMER}, AbstractorConfig(), 16)
    with pytest.raises(ConfigError, match="abstractor.variant must be one of"):
        AbstractorConfig(variant="perceiver")


def test_assemble_starts_the_qformer_from_blip2(tiny_hf_clip_vision, hf_qformer, tmp_path):
    """convert.assemble --abstractor qformer --qformer-from: the directory loads and its Q-Former is BLIP-2's."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, LlamaConfig, LlamaForCausalLM

    from g4v_jax.convert.assemble import main

    clip_dir, _ = tiny_hf_clip_vision  # 32 wide: the Q-Former must read 32-wide features
    torch.manual_seed(2)
    qf = tmp_path / "qf"
    Blip2QFormerModel(Blip2QFormerConfig(**{**QFORMER, "encoder_hidden_size": 32})).save_pretrained(qf)
    llm = tmp_path / "llm"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(llm)
    main(["--vision", str(clip_dir), "--llm", str(llm), str(tmp_path / "g4v"), "--abstractor", "qformer",
          "--qformer-from", str(qf), "model.abstractor.num_query_tokens=5"])
    model = g4v_jax.load(tmp_path / "g4v")
    assert model.cfg.abstractor.variant == "qformer" and model.cfg.num_video_tokens == 5
    hf_w = Blip2QFormerModel.from_pretrained(qf).encoder.layer[2].crossattention.attention.key.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(model.abstractor.layers[2].crossattention.key.kernel[...]), hf_w.T)
    frames = np.zeros((1, 4, 56, 56, 3), np.uint8)
    assert model.encode_videos(frames).shape == (1, 5, 16)
