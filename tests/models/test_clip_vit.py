"""CLIP vision tower vs HF transformers CLIPVisionModel on the same weights (fp32, CPU)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from g4v_jax.convert.hf_clip import load_hf_clip_vision
from g4v_jax.config import load_config
from g4v_jax.models.clip_vit import CLIP_MEAN, CLIP_STD, CLIPVisionTower

torch = pytest.importorskip("torch")


def _hf_forward(model, frames_uint8):
    b, t, h, w, _ = frames_uint8.shape
    pixels = ((frames_uint8 / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32)
    pixels = pixels.reshape(b * t, h, w, 3).transpose(0, 3, 1, 2)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels))
    return out.last_hidden_state.numpy().reshape(b, t, -1, out.last_hidden_state.shape[-1]), \
        out.pooler_output.numpy().reshape(b, t, -1)


def test_parity_with_hf_clip_vision(tiny_hf_clip_vision, rng):
    path, hf_model = tiny_hf_clip_vision
    cfg, tower = load_hf_clip_vision(path)
    frames = rng.integers(0, 256, (2, 3, 56, 56, 3), dtype=np.uint8)
    ours = tower(frames)
    ref_last, ref_pooled = _hf_forward(hf_model, frames)
    last_diff = np.abs(np.asarray(ours.last_hidden_state) - ref_last).max()
    pooled_diff = np.abs(np.asarray(ours.pooled) - ref_pooled).max()
    print(f"CLIP vision parity: last_hidden_state max|diff| {last_diff:.2e}, pooled {pooled_diff:.2e}")
    assert ours.last_hidden_state.shape == (2, 3, 17, 32)
    assert last_diff <= 1e-4 and pooled_diff <= 1e-4


def test_float_frames_equal_uint8(tiny_hf_clip_vision, rng):
    _, tower = load_hf_clip_vision(tiny_hf_clip_vision[0])
    frames = rng.integers(0, 256, (1, 2, 56, 56, 3), dtype=np.uint8)
    a = tower(frames).last_hidden_state
    b = tower(frames.astype(np.float32) / 255.0).last_hidden_state
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_wrong_frame_size_is_a_clear_error(tiny_hf_clip_vision):
    _, tower = load_hf_clip_vision(tiny_hf_clip_vision[0])
    with pytest.raises(ValueError, match="expects 56x56.*g4v_jax.data.video"):
        tower(np.zeros((1, 2, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(batch, T, H, W, 3\)"):
        tower(np.zeros((2, 56, 56, 3), np.uint8))


def test_vit_l14_shapes_and_parameter_count():
    """The paper's tower: 24 layers, width 1024, 257 tokens per 224px frame, same parameter count as HF's ViT-L/14."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = load_config({"model": "model/clip_vit_l14.yaml"}).model.vision
    tower = nnx.eval_shape(lambda: CLIPVisionTower(cfg, rngs=nnx.Rngs(0)))
    _, state = nnx.split(tower)
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    hf_cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=224, patch_size=14)
    with torch.device("meta"):
        hf = CLIPVisionModel(hf_cfg)
    theirs = sum(p.numel() for p in hf.parameters())
    assert ours == theirs == 303_179_776
    graphdef, state = nnx.split(tower)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                         jax.ShapeDtypeStruct((2, 4, 224, 224, 3), np.uint8))
    assert out.last_hidden_state.shape == (2, 4, 257, 1024)
    assert out.pooled.shape == (2, 4, 1024)


def test_a_new_tower_is_initialised_as_transformers_initialises_clip():
    """Trained from scratch (the world's tower), the initial scale decides how soon shape is learnt at all
    (docs/world.md): every weight matrix starts with the standard deviation HF's ``CLIPVisionModel`` gives it."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    d, layers = 128, 3
    cfg = load_config("tiny").model.vision
    cfg = dataclasses.replace(cfg, hidden_size=d, intermediate_size=4 * d, num_layers=layers, num_heads=4,
                              temporal_adapter=False)
    ours = CLIPVisionTower(cfg, rngs=nnx.Rngs(0))
    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                                          num_attention_heads=4, image_size=cfg.image_size,
                                          patch_size=cfg.patch_size))
    hf_std = {k: float(v.std()) for k, v in hf.state_dict().items() if k.endswith("weight") and v.ndim >= 2}
    pairs = {"embeddings.patch_embedding.weight": ours.embeddings.patch_embedding,
             "embeddings.position_embedding.weight": ours.embeddings.position_embedding}
    for i, layer in enumerate(ours.layers):
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            pairs[f"encoder.layers.{i}.self_attn.{name}.weight"] = getattr(layer.self_attn, name).kernel
        pairs[f"encoder.layers.{i}.mlp.fc1.weight"] = layer.mlp.fc1.kernel
        pairs[f"encoder.layers.{i}.mlp.fc2.weight"] = layer.mlp.fc2.kernel
    for hf_name, p in pairs.items():
        theirs = hf_std.get(hf_name, hf_std.get("vision_model." + hf_name))
        assert abs(float(np.std(np.asarray(p[...]))) / theirs - 1) < 0.05, hf_name
