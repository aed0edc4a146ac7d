"""A user-supplied TorchScript Inception network for FID (``python -m g4v_jax.eval.t2v --inception PATH``).

Inception weights cannot be downloaded here, so FID runs only with a network the user brings, as a TorchScript
archive read with ``torch.jit.load`` (which rebuilds TorchScript code and tensors; it does not unpickle arbitrary
Python, unlike StyleGAN2-ADA's ``.pkl`` or a ``torch.save``'d module). The reference file is NVIDIA's
``inception-2015-12-05.pt`` (the TF FID Inception-v3 ported to TorchScript; used by StyleGAN2-ADA and clean-fid).

Calling convention (decided once, from the TorchScript ``forward`` schema)
    * ``forward`` has a ``return_features`` argument (NVIDIA's file: ``forward(img, return_features=False,
      use_fp16=False, no_output_bias=False)``): called as ``net(images, return_features=True)``, which returns the
      2048-d pool features (as clean-fid does with ``resize_inside=True``).
    * otherwise: ``net(images)``, which must return the features itself.
    Either way the output must be ``(N, D)`` (``(N, D, 1, 1)`` is flattened); anything else is an error.

Input (``inception_input``)
    float32 NCHW, RGB, values in the uint8 range [0, 255] (not normalised: NVIDIA's network maps x -> (x - 128) / 128
    itself), 299 x 299. Frames get there in two steps:

    1. geometry, ``resize="center_crop"`` (default): the centre square of each frame (side = the short side, offset
       ``(extent - side) // 2``), so generated 16:9 and reference 4:3 frames are not stretched differently;
       ``resize="stretch"``: the whole frame (aspect ratio not kept), which is clean-fid's choice.
    2. ``torch.nn.functional.interpolate(mode="bicubic", antialias=True, align_corners=False)`` on float values,
       clamped to [0, 255] and not re-quantised: clean-fid's "clean" resize (PIL bicubic on float32 channels), which
       it matches to within 0.01 on the 0-255 scale. A frame already 299 x 299 is passed through unchanged. NVIDIA's
       network would resize internally too (bilinear, not antialiased); on 299 x 299 input that step is the identity.

Torch is an optional extra (``pip install 'g4v-jax[torch]'``) and is imported only here, inside the functions.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
from g4v_jax.data.io import sha256_of

INCEPTION_SIZE = 299
RESIZE_MODES = ("center_crop", "stretch")


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("FID runs the TorchScript Inception network with PyTorch, which is not installed: "
                          "pip install 'g4v-jax[torch]' (any torch >= 2 will do)") from e
    return torch


@dataclasses.dataclass(frozen=True, eq=False)
class InceptionNetwork:
    """A loaded feature extractor: the TorchScript module, where it came from, and how to call it."""

    module: Any  # torch.jit.ScriptModule
    path: str
    sha256: str
    return_features_kwarg: bool  # True: module(x, return_features=True); False: module(x)
    device: str

    @property
    def call(self) -> str:
        """The call as written into reports."""
        return "net(images, return_features=True)" if self.return_features_kwarg else "net(images)"


def _forward_arguments(module) -> list[str]:
    """Argument names of ``module.forward`` (TorchScript schema, or the Python signature for a plain nn.Module)."""
    try:
        return [a.name for a in module.forward.schema.arguments]
    except AttributeError:
        import inspect

        return list(inspect.signature(module.forward).parameters)


def load_inception(path: str | os.PathLike, device: str = "cpu") -> InceptionNetwork:
    """``torch.jit.load`` a TorchScript feature extractor onto ``device``, in eval mode; ``ValueError`` naming the file
    when it is missing or not a TorchScript archive."""
    torch = _torch()

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"Inception network {str(p)!r} not found (or not a file)")
    try:
        module = torch.jit.load(str(p), map_location=device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(
            f"{p}: not a TorchScript archive ({type(e).__name__}: {str(e).split('. ')[0]}). "
            "Give a torch.jit.save'd network such as NVIDIA's inception-2015-12-05.pt; pickled modules (.pkl, "
            "torch.save) are refused because unpickling runs arbitrary code") from None
    module.eval()
    return InceptionNetwork(module=module, path=str(p), sha256=sha256_of(p),
                            return_features_kwarg="return_features" in _forward_arguments(module), device=device)


def center_square(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, C) -> (T, S, S, C) with S = min(H, W): the centre square, offset ``(extent - S) // 2``."""
    h, w = frames.shape[1:3]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return frames[:, top:top + s, left:left + s]


def inception_input(frames: np.ndarray, resize: str = "center_crop", size: int = INCEPTION_SIZE) -> np.ndarray:
    """uint8 RGB frames (T, H, W, 3) -> float32 (T, 3, size, size) in [0, 255], as the module docstring says."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    v = np.asarray(frames)
    if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3 or 0 in v.shape:
        raise ValueError(f"Inception input needs uint8 RGB frames (T, H, W, 3), got {v.dtype} {v.shape}")
    torch = _torch()
    if resize == "center_crop":
        v = center_square(v)
    x = torch.from_numpy(np.ascontiguousarray(v)).permute(0, 3, 1, 2).to(torch.float32)
    if tuple(x.shape[2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                                            align_corners=False).clamp_(0.0, 255.0)
    return np.ascontiguousarray(x.numpy())


def inception_features(net: InceptionNetwork, images: np.ndarray) -> np.ndarray:
    """float32 (N, 3, S, S) in [0, 255] -> float32 (N, D) features, in one call of the network (the caller batches).
    ``ValueError`` when the network returns anything but N finite D-vectors."""
    torch = _torch()
    x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(net.device)
    with torch.inference_mode():
        out = net.module(x, return_features=True) if net.return_features_kwarg else net.module(x)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{net.path}: {net.call} returned {type(out).__name__}, expected a (N, D) tensor")
    n = x.shape[0]
    if out.ndim == 4 and out.shape[0] == n and out.shape[2:] == (1, 1):  # an un-flattened global pool
        out = out.reshape(n, -1)
    if out.ndim != 2 or out.shape[0] != n:
        raise ValueError(f"{net.path}: {net.call} returned shape {tuple(out.shape)} for {n} images, expected "
                         f"({n}, D) features")
    feats = out.detach().to("cpu", torch.float32).numpy()
    if not np.isfinite(feats).all():
        raise ValueError(f"{net.path}: {net.call} returned non-finite features")
    return feats
