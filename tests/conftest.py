"""Shared fixtures: tiny random HF checkpoints written to temp dirs (never downloaded)."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_hf_clip_vision(tmp_path_factory):
    """A tiny random transformers CLIPVisionModel saved with save_pretrained: (dir, torch model)."""
    torch = pytest.importorskip("torch")  # the torch extra is installed by `python3 dev.py test`
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=14, hidden_act="quick_gelu")
    model = CLIPVisionModel(cfg).eval()
    # random LayerNorm affine params so that a scale/bias mix-up cannot hide behind ones and zeros
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf_clip_vision")
    model.save_pretrained(path)
    return path, model


@pytest.fixture
def rng():
    return np.random.default_rng(0)
