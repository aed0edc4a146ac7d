"""The user-supplied TorchScript Inception network: loading, calling convention, input preparation, errors."""

import hashlib
import sys

import numpy as np
import pytest

from g4v_jax.eval.inception import center_square, inception_features, inception_input, load_inception

torch = pytest.importorskip("torch")


class _WithFlag(torch.nn.Module):
    """NVIDIA's convention: features only with ``return_features=True``."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False) -> torch.Tensor:
        feats = torch.tanh(self.conv(img / 128.0 - 1.0)).mean(dim=(2, 3))
        return feats if return_features else feats.softmax(-1)


class _Plain(torch.nn.Module):
    def __init__(self, shape: str = "nd"):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.tanh(self.conv(x / 128.0 - 1.0)).mean(dim=(2, 3), keepdim=True)  # (N, 4, 1, 1)
        if self.shape == "nd11":
            return pooled
        if self.shape == "bad":
            return pooled.reshape(x.shape[0], 2, 2)
        if self.shape == "nan":
            return pooled.flatten(1) * float("nan")
        return pooled.flatten(1)


def _save(module, path, trace=False):
    torch.manual_seed(0)
    scripted = torch.jit.trace(module.eval(), torch.rand(1, 3, 16, 16) * 255) if trace else torch.jit.script(module)
    torch.jit.save(scripted, str(path))
    return path


def test_calling_convention_is_read_from_the_schema(tmp_path, rng):
    x = (rng.random((3, 3, 20, 20)) * 255).astype(np.float32)
    flagged = load_inception(_save(_WithFlag(), tmp_path / "nv.pt"))
    assert flagged.return_features_kwarg and flagged.call == "net(images, return_features=True)"
    assert flagged.sha256 == hashlib.sha256((tmp_path / "nv.pt").read_bytes()).hexdigest()
    ref = torch.jit.load(str(tmp_path / "nv.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(inception_features(flagged, x), ref(torch.from_numpy(x), return_features=True),
                                   rtol=1e-6)
    plain = load_inception(_save(_Plain(), tmp_path / "plain.pt", trace=True))
    assert not plain.return_features_kwarg and plain.call == "net(images)"
    with torch.no_grad():
        np.testing.assert_allclose(inception_features(plain, x), torch.jit.load(str(tmp_path / "plain.pt"))(
            torch.from_numpy(x)), rtol=1e-6)


def test_output_shapes(tmp_path, rng):
    x = (rng.random((2, 3, 12, 12)) * 255).astype(np.float32)
    pooled = load_inception(_save(_Plain("nd11"), tmp_path / "nd11.pt"))
    assert inception_features(pooled, x).shape == (2, 4)
    with pytest.raises(ValueError, match=r"bad.pt: net\(images\) returned shape \(2, 2, 2\) for 2 images"):
        inception_features(load_inception(_save(_Plain("bad"), tmp_path / "bad.pt")), x)
    with pytest.raises(ValueError, match=r"non-finite"):
        inception_features(load_inception(_save(_Plain("nan"), tmp_path / "nan.pt")), x)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match=r"nope.pt' not found"):
        load_inception(tmp_path / "nope.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")  # a pickle, not TorchScript: refused, not unpickled
    with pytest.raises(ValueError, match=r"pickled.pt: not a TorchScript archive .*pickled modules"):
        load_inception(tmp_path / "pickled.pt")
    (tmp_path / "junk.pt").write_text("hello")
    with pytest.raises(ValueError, match=r"junk.pt: not a TorchScript archive"):
        load_inception(tmp_path / "junk.pt")


def test_inception_input_matches_clean_fid_resize(rng):
    from PIL import Image

    frames = rng.integers(0, 256, (2, 48, 80, 3), dtype=np.uint8)

    def clean_fid(frame):  # clean-fid's "clean" resize: PIL bicubic on each float32 channel, clipped, not quantised
        return np.stack([np.asarray(Image.fromarray(frame[:, :, c].astype(np.float32), mode="F").resize(
            (299, 299), Image.BICUBIC)).clip(0, 255) for c in range(3)])

    stretched = inception_input(frames, "stretch")
    assert stretched.shape == (2, 3, 299, 299) and stretched.dtype == np.float32
    np.testing.assert_allclose(stretched[1], clean_fid(frames[1]), atol=0.02)
    cropped = inception_input(frames, "center_crop")
    np.testing.assert_array_equal(center_square(frames), frames[:, :, 16:64])
    np.testing.assert_allclose(cropped[0], clean_fid(frames[0, :, 16:64]), atol=0.02)
    exact = rng.integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)  # already 299: passed through unchanged
    np.testing.assert_array_equal(inception_input(exact), exact.transpose(0, 3, 1, 2).astype(np.float32))


def test_inception_input_errors():
    with pytest.raises(ValueError, match=r"uint8 RGB frames"):
        inception_input(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"resize must be one of"):
        inception_input(np.zeros((1, 8, 8, 3), np.uint8), "squash")


def test_missing_torch_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'g4v-jax\[torch\]'"):
        load_inception(tmp_path / "any.pt")
