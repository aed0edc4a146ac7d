"""HF CLIP checkpoints in every layout users bring -> our vision tower; the CLI end to end; clear mismatch errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import g4v_jax
from g4v_jax.convert.hf_clip import load_hf_clip_vision
from g4v_jax.weights import CheckpointMismatchError, named_params

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]


def _same_params(a, b):
    pa, pb = named_params(a), named_params(b)
    assert pa.keys() == pb.keys()
    return max(float(np.abs(np.asarray(pa[k]) - np.asarray(pb[k])).max()) for k in pa)


def test_sharded_safetensors_and_bin_load_identically(tiny_hf_clip_vision, tmp_path):
    path, hf_model = tiny_hf_clip_vision
    _, reference = load_hf_clip_vision(path)
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    hf_model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    bins = list((tmp_path / "bin").glob("*.bin"))
    if not bins:  # transformers 5 always writes safetensors: write the legacy .bin layout ourselves
        torch.save(hf_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
        for f in (tmp_path / "bin").glob("*.safetensors"):
            f.unlink()
    for layout in ("sharded", "bin"):
        _, tower = load_hf_clip_vision(tmp_path / layout)
        assert _same_params(tower, reference) == 0.0, layout


def test_bf16_checkpoint(tiny_hf_clip_vision, tmp_path):
    path, hf_model = tiny_hf_clip_vision
    import copy

    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # .to() is in place
    _, tower = load_hf_clip_vision(tmp_path / "bf16")
    _, reference = load_hf_clip_vision(path)
    assert 0 < _same_params(tower, reference) < 1e-2  # bf16 rounding only


def test_full_clip_model_skips_text_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=14),
        projection_dim=8,
    )
    torch.manual_seed(1)
    full = CLIPModel(cfg).eval()
    full.save_pretrained(tmp_path / "clip")
    vcfg, tower = load_hf_clip_vision(tmp_path / "clip")
    assert vcfg.num_layers == 2
    frames = np.random.default_rng(0).integers(0, 256, (1, 1, 56, 56, 3), dtype=np.uint8)
    from g4v_jax.models.clip_vit import CLIP_MEAN, CLIP_STD

    px = ((frames[0] / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32).transpose(0, 3, 1, 2)
    with torch.no_grad():
        ref = full.vision_model(pixel_values=torch.from_numpy(px)).last_hidden_state.numpy()
    assert np.abs(np.asarray(tower(frames).last_hidden_state[0]) - ref).max() <= 1e-4


def test_mismatched_checkpoint_names_keys_and_shapes(tiny_hf_clip_vision, tmp_path):
    path, hf_model = tiny_hf_clip_vision
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the config promises a layer the weights lack
    cfg["intermediate_size"] = 72
    hf_model.save_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError) as e:
        load_hf_clip_vision(tmp_path / "bad")
    msg = str(e.value)
    assert "missing keys" in msg and "encoder.layers.2.self_attn.q_proj.weight" in msg
    assert "encoder.layers.0.mlp.fc1.weight: checkpoint (64, 32), model needs (72, 32)" in msg


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no model.safetensors, pytorch_model.bin or sharded index"):
        load_hf_clip_vision(tmp_path)


def test_cli_converts_and_g4v_jax_load_runs(tiny_hf_clip_vision, tmp_path):
    path, _ = tiny_hf_clip_vision
    dst = tmp_path / "converted"
    proc = subprocess.run(
        [sys.executable, "-m", "convert.hf_clip", str(path), str(dst), "--llm-hidden-size", "64",
         "model.abstractor.hidden_size=32", "model.abstractor.num_heads=4", "model.abstractor.num_layers=1",
         "model.abstractor.intermediate_size=48", "model.abstractor.num_query_tokens=8",
         "model.abstractor.num_temporal_tokens=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "g4v_jax.load(" in proc.stdout
    model = g4v_jax.load(dst)
    _, tower = load_hf_clip_vision(path)
    params = named_params(model)
    for k, v in named_params(tower).items():
        np.testing.assert_array_equal(np.asarray(params[f"vision_model.{k}"]), np.asarray(v))
    frames = np.random.default_rng(0).integers(0, 256, (1, 4, 56, 56, 3), dtype=np.uint8)
    assert model(frames).shape == (1, 8, 64)
    bf16 = g4v_jax.load(dst, ["model.param_dtype=bfloat16"])
    assert str(bf16.vision_model.layers[0].mlp.fc1.kernel[...].dtype) == "bfloat16"


def test_not_a_clip_config_is_a_clear_error(tiny_hf_clip_vision, tmp_path):
    path, hf_model = tiny_hf_clip_vision
    hf_model.save_pretrained(tmp_path / "x")
    (tmp_path / "x" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a CLIP \\(vision\\) config: it lacks hidden_size"):
        load_hf_clip_vision(tmp_path / "x")


@pytest.mark.parametrize("variant", ["qformer", "st_pool"])
def test_the_table_5_variants_convert_too(tiny_hf_clip_vision, tmp_path, variant):
    from g4v_jax.convert.hf_clip import convert

    path, _ = tiny_hf_clip_vision
    dst = convert(path, tmp_path / variant, abstractor=variant, llm_hidden_size=64,
                  overrides=["model.abstractor.num_layers=2", "model.abstractor.num_query_tokens=8"])
    model = g4v_jax.load(dst)
    cfg = model.cfg
    assert cfg.abstractor.variant == variant and cfg.abstractor.hidden_size == 32  # as wide as the tower
    want = 8 if variant == "qformer" else cfg.num_frames + cfg.vision.num_patches
    frames = np.random.default_rng(0).integers(0, 256, (1, cfg.num_frames, 56, 56, 3), dtype=np.uint8)
    assert cfg.num_video_tokens == want and model(frames).shape == (1, want, 64)
