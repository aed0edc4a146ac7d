"""CLIP text tower + CLIPModel vs HF transformers (fp32, CPU), and the CLIPSIM / FD-CLIP metrics."""

import dataclasses

import jax
import numpy as np
import pytest

from flax import nnx

from g4v_jax.eval.t2v import FD_CLIP, clipsim, fd_clip, frechet_distance, score_videos
from g4v_jax.models.clip_text import eos_positions
from g4v_jax.models.clip_vit import CLIP_MEAN, CLIP_STD

torch = pytest.importorskip("torch")

VOCAB, MAXPOS, IMG = 99, 16, 28


def _tiny_clip(tmp_path_factory, eos_token_id):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=VOCAB, max_position_embeddings=MAXPOS, eos_token_id=eos_token_id,
                         bos_token_id=0, pad_token_id=1, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMG, patch_size=14, hidden_act="quick_gelu"),
        projection_dim=16)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # random LayerNorm affines and logit scale, so that no mix-up hides behind 1s and 0s
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(1.3)
    path = tmp_path_factory.mktemp(f"hf_clip_eos{eos_token_id}")
    model.save_pretrained(path)
    return path, model


EOS = 49  # an EOS id that is not the largest id, so that the two pooling rules pick different positions


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from convert.hf_clip_text import load_hf_clip

    path, hf = _tiny_clip(tmp_path_factory, EOS)
    return hf, load_hf_clip(path)


def _ids(eos, rng):
    """Right-padded rows (pad id 1), one full length. eos=2 (legacy): EOT is id 98, the row maximum; otherwise EOS is
    ``eos`` and the other tokens are larger, so argmax-pooling would pick a wrong position."""
    ids = rng.integers(50, 98, (4, MAXPOS))
    mask = np.ones_like(ids)
    for row, n in enumerate([5, MAXPOS - 1, 9, 3]):
        ids[row, n] = 98 if eos == 2 else eos
        ids[row, n + 1:] = 1
        mask[row, n + 1:] = 0
    return ids, mask


@nnx.jit
def _ours(model, ids, frames, mask):
    """Everything the parity test compares, in one compiled program."""
    return (model.text_model(ids, mask).pooled, model.text_model(ids).pooled, model.get_text_features(ids, mask),
            model.get_image_features(frames), model(ids, frames, mask))


@pytest.mark.parametrize("eos", [2, EOS], ids=["legacy_eos_argmax", "eos_id"])
def test_parity_with_hf_clip_model(tiny_clip, eos, rng):
    hf, ours = tiny_clip
    # both pooling rules on one model: HF reads the attribute, ours the config
    hf.text_model.eos_token_id = eos
    ours.text_model.cfg = dataclasses.replace(ours.text_model.cfg, eos_token_id=eos)
    ids, mask = _ids(eos, rng)
    frames = rng.integers(0, 256, (3, IMG, IMG, 3), dtype=np.uint8)
    pixels = ((frames / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32).transpose(0, 3, 1, 2)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 pixel_values=torch.from_numpy(pixels))
        ref_pooled = hf.text_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).pooler_output
        ref_text = hf.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        ref_img = hf.get_image_features(pixel_values=torch.from_numpy(pixels))
    ref_text = getattr(ref_text, "pooler_output", ref_text).numpy()
    ref_img = getattr(ref_img, "pooler_output", ref_img).numpy()
    with jax.default_matmul_precision("highest"):
        pooled, pooled_nomask, text, img, out = jax.tree.map(np.asarray, _ours(ours, ids, frames, mask))
    d = {"text pooled": np.abs(pooled - ref_pooled.numpy()).max(), "text_embeds": np.abs(text - ref_text).max(),
         "image_embeds": np.abs(img - ref_img).max(),
         "logits_per_text": np.abs(np.asarray(out.logits_per_text) - ref.logits_per_text.numpy()).max()}
    print(f"CLIPModel parity (eos_token_id={eos}): " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    assert text.shape == (4, 16) and img.shape == (3, 16)
    assert max(d.values()) <= 1e-4
    # without the padding mask the pooled output (right padding, EOS before the pads) is the same
    np.testing.assert_allclose(pooled_nomask, pooled, atol=1e-5)


def test_eos_positions_follow_hf_rule():
    ids = np.array([[0, 5, 7, 3, 3], [0, 9, 3, 1, 1]])
    np.testing.assert_array_equal(np.asarray(eos_positions(ids, 2)), [2, 1])  # argmax of ids (first maximum)
    np.testing.assert_array_equal(np.asarray(eos_positions(ids, 3)), [3, 2])  # first eos occurrence


def test_clipsim_known_vectors():
    text = np.array([[1.0, 0.0], [0.0, 2.0]])
    frames = np.array([[[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]],  # cos 1, 0, 1/sqrt2
                       [[0.0, -1.0], [0.0, 5.0], [1.0, 0.0]]])  # cos -1, 1, 0
    np.testing.assert_allclose(clipsim(text, frames), [(1 + 2 ** -0.5) / 3, 0.0], atol=1e-12)
    mask = np.array([[True, True, False], [False, True, True]])
    np.testing.assert_allclose(clipsim(text, frames, mask), [0.5, 0.5], atol=1e-12)


def test_fd_clip(rng):
    a = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))
    assert FD_CLIP == "FD-CLIP"
    assert abs(fd_clip(a, a)) < 1e-6
    shift = rng.normal(size=8)
    # same covariance, shifted mean: the trace term vanishes, FD = |shift|^2 exactly
    np.testing.assert_allclose(fd_clip(a, a + shift), shift @ shift, rtol=1e-6)
    b = rng.normal(size=(300, 8)) * 2.0 + 1.0
    np.testing.assert_allclose(fd_clip(a, b), fd_clip(b, a), rtol=1e-8)
    # analytic: N(0, I) vs N(m, 4I) in d dims -> |m|^2 + d (1 + 4 - 2*2)
    d, m = 8, np.full(8, 0.5)
    np.testing.assert_allclose(frechet_distance(np.zeros(d), np.eye(d), m, 4 * np.eye(d)), m @ m + d, rtol=1e-10)


class _FakeTokenizer:
    """Called like an HF CLIP tokenizer: 0 = BOS, EOS = 49, 1 = pad."""

    def __call__(self, prompts, padding, max_length, truncation, return_tensors):
        ids = np.ones((len(prompts), max_length), np.int64)
        mask = np.zeros_like(ids)
        for i, p in enumerate(prompts):
            toks = [0] + [50 + (ord(c) % 48) for c in p][:max_length - 2] + [EOS]
            ids[i, :len(toks)] = toks
            mask[i, :len(toks)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def test_score_videos(tiny_clip, rng):
    hf, ours = tiny_clip
    hf.text_model.eos_token_id = EOS
    ours.text_model.cfg = dataclasses.replace(ours.text_model.cfg, eos_token_id=EOS)
    tok = _FakeTokenizer()
    prompts = ["a cat", "a dog on a skateboard"]
    videos = [rng.integers(0, 256, (3, IMG, IMG, 3), dtype=np.uint8),
              rng.integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)]  # other size: resized + center-cropped
    got = score_videos(ours, tok, prompts, videos)
    enc = tok(prompts, padding="max_length", max_length=MAXPOS, truncation=True, return_tensors="np")
    from g4v_jax.eval.t2v import _frames_at

    with torch.no_grad():
        t = hf.get_text_features(input_ids=torch.from_numpy(enc["input_ids"]),
                                 attention_mask=torch.from_numpy(enc["attention_mask"]))
        t = getattr(t, "pooler_output", t).numpy()
        want = []
        for i, v in enumerate(videos):
            px = ((_frames_at(v, IMG) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32).transpose(0, 3, 1, 2)
            f = hf.get_image_features(pixel_values=torch.from_numpy(px))
            f = getattr(f, "pooler_output", f).numpy()
            want.append(clipsim(t[i:i + 1], f[None])[0])
    assert got.shape == (2,)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_text_tower_alone_from_clip_text_model(tiny_clip, tmp_path, rng):
    """transformers 5 saves a CLIPTextModel without the ``text_model.`` prefix; the converter reads both layouts."""
    from safetensors import safe_open

    from convert.hf_clip_text import load_hf_clip_text

    hf, ours = tiny_clip
    hf.text_model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        prefixed = any(k.startswith("text_model.") for k in f.keys())
    cfg, tower = load_hf_clip_text(tmp_path)
    assert cfg.hidden_size == 32 and cfg.max_position_embeddings == MAXPOS
    for name in ("embeddings.token_embedding", "layers.1.self_attn.q_proj.kernel", "final_layer_norm.scale"):
        a = tower
        b = ours.text_model
        for part in name.split("."):
            a, b = (a[int(part)], b[int(part)]) if part.isdigit() else (getattr(a, part), getattr(b, part))
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=f"{name} (prefixed={prefixed})")


def test_mismatch_is_reported_in_checkpoint_names(tiny_clip, tmp_path):
    from safetensors.numpy import load_file, save_file

    from convert.hf_clip_text import load_hf_clip
    from g4v_jax.weights import CheckpointMismatchError

    hf, _ = tiny_clip
    hf.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["text_projection.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): text_projection\.weight"):
        load_hf_clip(tmp_path)
