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


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    """A tiny training set on disk: 8 one-video examples (real mp4 files), their manifest and a BPE tokenizer."""
    from g4v_jax.data.manifest import Example, write_manifest
    from g4v_jax.data.template import SYSTEM_PROMPT, Turn
    from g4v_jax.data.tokenizer import build_bpe_tokenizer
    from g4v_jax.data.video import synthetic_frames, write_video

    colours = ["red", "green", "blue", "yellow"]
    root = tmp_path_factory.mktemp("train_data")
    (root / "videos").mkdir()
    examples, corpus = [], []
    for i in range(8):
        write_video(root / "videos" / f"v{i}.mp4", synthetic_frames(8, 64, 64, seed=i))
        caption = f"a {colours[i % 4]} square moves {'left' if i % 2 else 'right'}"
        turns = (Turn("human", video=0), Turn("human", "What happens in the video?"), Turn("ai", caption))
        examples.append(Example(id=f"ex{i}", videos=(f"videos/v{i}.mp4",), captions=(caption,), turns=turns,
                                safety=None))
        corpus += [caption, "What happens in the video?", SYSTEM_PROMPT, "###Human: ###AI: <video> </video>"]
    write_manifest(root / "train.jsonl", examples)
    build_bpe_tokenizer(corpus * 4, root / "tokenizer", vocab_size=512)
    return root
