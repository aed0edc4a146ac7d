"""Checkpoints from elsewhere are untrusted: a pickle that would run code is refused before anything runs, a
safetensors header that lies is caught before anything is allocated, and a fresh abstractor fits its tower."""

import os

import numpy as np
import pytest

from g4v_jax.weights import SafetensorsError, read_safetensors, write_safetensors


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    torch = pytest.importorskip("torch")
    from g4v_jax.convert.common import TorchBinTensors

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError) as e:
        TorchBinTensors(tmp_path / "pytorch_model.bin")
    assert "is not a plain weights file" in str(e.value) and "will not unpickle it" in str(e.value)
    assert "weights_only=False" not in str(e.value)  # torch's advice to run the file's code is not passed on
    assert not marker.exists()


def test_a_plain_bin_still_loads(tmp_path):
    torch = pytest.importorskip("torch")
    from g4v_jax.convert.common import TorchBinTensors

    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, tmp_path / "pytorch_model.bin")
    np.testing.assert_array_equal(TorchBinTensors(tmp_path / "pytorch_model.bin")["w"], np.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("mutate,message", [
    (lambda raw: raw[:-8], r"tensor 'b': data_offsets \[24, 48\] lie outside the file's 40 data bytes"),
    (lambda raw: (2**40).to_bytes(8, "little") + raw[8:], r"the header claims 1099511627776 bytes"),
    (lambda raw: raw[:5], r"too short for a safetensors file"),
    (lambda raw: raw.replace(b'"shape":[3,2]', b'"shape":[9,2]'),
     r"tensor 'a': 24 bytes for shape \[9, 2\] of F32, which needs 72"),
])
def test_a_safetensors_header_that_lies_names_the_tensor(tmp_path, mutate, message):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"a": np.ones((3, 2), np.float32), "b": np.zeros((3, 2), np.float32)})
    assert set(read_safetensors(path)) == {"a", "b"}
    raw = path.read_bytes()
    path.write_bytes(mutate(raw))
    with pytest.raises(SafetensorsError, match=message):
        read_safetensors(path)


def test_hf_clip_sizes_the_fresh_abstractor_to_the_tower(tiny_hf_clip_vision, tmp_path):
    """A 2-layer, 32-wide tower used to get ViT-L's 1024-wide abstractor (a 326 MB directory)."""
    import g4v_jax
    from g4v_jax.convert.hf_clip import convert

    src, _ = tiny_hf_clip_vision
    dst = convert(src, tmp_path / "enc", llm_hidden_size=64, overrides=["model.abstractor.num_layers=2"])
    cfg = g4v_jax.weights.load_model_config(dst).model
    assert (cfg.abstractor.hidden_size, cfg.abstractor.num_heads) == (32, 4)
    assert cfg.abstractor.intermediate_size == 88  # the preset's 2816 / 1024 ratio
    assert (cfg.video.sampling, cfg.video.resize) == ("uniform_mid", "short_side_crop")  # CLIP's preprocessing
    assert (dst / "model.safetensors").stat().st_size < 2_000_000
    model = g4v_jax.load(dst)
    assert model.abstractor is not None
