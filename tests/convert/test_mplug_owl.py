"""mPLUG-Owl-video converter parity: an independent NumPy reference of the vision tower + visual abstractor.

The reference below is written from the mPLUG-Owl-video specification (tensor names and layouts as in the released
checkpoint), not from ``g4v_jax``'s model code. It runs in float64; our Flax model runs in float32 on CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from g4v_jax.convert.mplug_owl import abstractor_mlp_width, export_mplug_owl, load_mplug_owl, model_config_from_mplug
from g4v_jax.weights import CheckpointMismatchError, write_safetensors

TOL = 1e-4

# tiny mPLUG-Owl-video config: 56/14 -> 16 patches + CLS = 17 tokens per frame
DV, IV, LV, HV, IMG, P = 32, 64, 2, 4, 56, 14
DA, LA, HA, IA = 32, 2, 4, 384          # abstractor; MLP width abstractor_mlp_width(384) = 256
D_LLM, NQ = 64, 8
B, T = 2, 4
N = (IMG // P) ** 2
FA = abstractor_mlp_width(IA)

HF_CONFIG = {
    "vision_config": {"hidden_size": DV, "intermediate_size": IV, "num_hidden_layers": LV,
                      "num_attention_heads": HV, "image_size": IMG, "patch_size": P, "layer_norm_eps": 1e-6},
    "visual_abstractor_config": {"hidden_size": DA, "num_hidden_layers": LA, "num_attention_heads": HA,
                                 "intermediate_size": IA, "layer_norm_eps": 1e-6, "encoder_hidden_size": DV},
    "text_config": {"hidden_size": D_LLM},
    "num_query_tokens": NQ,
}

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


# ----------------------------------------------------------------------------------------------------------------------
# random checkpoint in mPLUG-Owl names / layouts
# ----------------------------------------------------------------------------------------------------------------------


def make_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}

    def w(name, *shape, scale=0.02):
        sd[name] = (rng.standard_normal(shape) * scale).astype(np.float32)

    def ln(prefix, d):
        sd[f"{prefix}.weight"] = (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        sd[f"{prefix}.bias"] = (0.05 * rng.standard_normal(d)).astype(np.float32)

    def lin(prefix, d_out, d_in, scale=0.02):
        w(f"{prefix}.weight", d_out, d_in, scale=scale)
        w(f"{prefix}.bias", d_out, scale=scale)

    v = "vision_model"
    w(f"{v}.embeddings.patch_embed.weight", DV, 3, P, P, scale=0.05)
    w(f"{v}.embeddings.cls_token", 1, 1, DV, scale=0.5)
    w(f"{v}.embeddings.position_embedding", 1, N + 1, DV, scale=0.5)
    ln(f"{v}.embeddings.pre_layernorm", DV)
    for i in range(LV):
        pre = f"{v}.encoder.layers.{i}"
        ln(f"{pre}.input_layernorm", DV)
        ln(f"{pre}.post_attention_layernorm", DV)
        # larger scale so that attention is far from uniform and a wrong q/k/v split would show
        lin(f"{pre}.self_attn.query_key_value", 3 * DV, DV, scale=0.3)
        lin(f"{pre}.self_attn.dense", DV, DV, scale=0.1)
        lin(f"{pre}.mlp.fc1", IV, DV, scale=0.1)
        lin(f"{pre}.mlp.fc2", DV, IV, scale=0.1)
        ln(f"{pre}.temporal.ln", DV)
        w(f"{pre}.temporal.down_proj.weight", DV // 2, DV, 1, 1, 1, scale=0.2)
        w(f"{pre}.temporal.down_proj.bias", DV // 2, scale=0.05)
        w(f"{pre}.temporal.conv.weight", DV // 2, 1, 3, 1, 1, scale=0.5)
        w(f"{pre}.temporal.conv.bias", DV // 2, scale=0.05)
        # non-zero (the released init zeros it) so the temporal path is exercised
        w(f"{pre}.temporal.up_proj.weight", DV, DV // 2, 1, 1, 1, scale=0.2)
        w(f"{pre}.temporal.up_proj.bias", DV, scale=0.05)
    ln(f"{v}.post_layernorm", DV)

    w("query_tokens", 1, NQ, DA, scale=1.0)
    w("temporal_query_tokens", 1, NQ, DA, scale=1.0)
    for i in range(LA):
        pre = f"abstractor.encoder.layers.{i}.crossattention"
        ln(f"{pre}.norm1", DA)
        ln(f"{pre}.normk", DV)
        lin(f"{pre}.attention.query", DA, DA, scale=0.3)
        lin(f"{pre}.attention.key", DA, DV, scale=0.3)
        lin(f"{pre}.attention.value", DA, DV, scale=0.1)
        lin(f"{pre}.output.out_proj", DA, DA, scale=0.1)
        ln(f"{pre}.output.norm2", DA)
        lin(f"{pre}.output.mlp.w1", FA, DA, scale=0.1)
        lin(f"{pre}.output.mlp.w3", FA, DA, scale=0.1)
        ln(f"{pre}.output.mlp.ffn_ln", FA)
        lin(f"{pre}.output.mlp.w2", DA, FA, scale=0.1)
    lin("abstractor.visual_fc", D_LLM, DA, scale=0.1)
    lin("abstractor.temporal_visual_fc", D_LLM, DA, scale=0.1)
    w("abstractor.vit_eos", 1, 1, D_LLM, scale=0.5)
    return sd


# tensors whose scale sets the variance of some LayerNorm's input (residual streams, query tokens, visual features)
_STREAM_SOURCES = (
    "vision_model.embeddings.patch_embed.", "vision_model.embeddings.cls_token", "vision_model.embeddings.position_",
    "vision_model.embeddings.pre_layernorm.", ".self_attn.dense.", ".mlp.fc2.", ".temporal.up_proj.",
    "vision_model.post_layernorm.", "query_tokens", ".crossattention.norm1.", ".output.out_proj.",
)


def small_streams(sd: dict[str, np.ndarray], factor: float = 0.01) -> dict[str, np.ndarray]:
    """Every LayerNorm input gets a variance ~1e-4, so an eps of 1e-5 vs 1e-6 changes outputs by ~1e-2 relative."""
    return {k: (a * np.float32(factor) if any(s in k for s in _STREAM_SOURCES) else a) for k, a in sd.items()}


def write_checkpoint(path, sd, config=HF_CONFIG):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    write_safetensors(path / "model.safetensors", sd)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# NumPy reference (float64)
# ----------------------------------------------------------------------------------------------------------------------


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _quick_gelu(x):
    return x / (1.0 + np.exp(-1.702 * x))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _softmax(x, axis=-1):
    x = x - x.max(axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis, keepdims=True)


def _ln(x, sd, name, eps):
    return _layer_norm(x, sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def ref_temporal(h, sd, pre):
    """mPLUG-Owl-video ``temporal`` adapter on (B, T, L, D); the CLS token is returned unchanged."""
    cls, x = h[:, :, :1], h[:, :, 1:]
    x = _ln(x, sd, f"{pre}.temporal.ln", 1e-5)                        # torch default eps
    # Conv3d 1x1x1 on the (B, C, T, H, W) grid == per-token linear over channels
    wd = sd[f"{pre}.temporal.down_proj.weight"][:, :, 0, 0, 0]
    x = x @ wd.T + sd[f"{pre}.temporal.down_proj.bias"]               # (B, T, N, C/2)
    wc = sd[f"{pre}.temporal.conv.weight"][:, 0, :, 0, 0]              # (C/2, 3)
    xp = np.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0)))                  # zero padding in time
    tt = x.shape[1]
    x = (wc[:, 0] * xp[:, 0:tt] + wc[:, 1] * xp[:, 1:tt + 1] + wc[:, 2] * xp[:, 2:tt + 2]
         + sd[f"{pre}.temporal.conv.bias"])
    x = _quick_gelu(x)
    wu = sd[f"{pre}.temporal.up_proj.weight"][:, :, 0, 0, 0]
    x = x @ wu.T + sd[f"{pre}.temporal.up_proj.bias"]
    return np.concatenate([cls, x], axis=2)


def ref_vision(frames_u8, sd):
    """(B, T, H, W, 3) uint8 -> post-LN features (B, T, N+1, D)."""
    sd = {k: np.asarray(a, np.float64) for k, a in sd.items()}
    b, t, hh, ww, _ = frames_u8.shape
    x = (frames_u8.astype(np.float64) / 255.0 - CLIP_MEAN) / CLIP_STD
    x = x.reshape(b * t, hh, ww, 3).transpose(0, 3, 1, 2)             # NCHW
    gh, gw = hh // P, ww // P
    # conv stride P, no bias, as an explicit patch matmul; patches in row-major (gh, gw) order
    patches = x.reshape(b * t, 3, gh, P, gw, P).transpose(0, 2, 4, 1, 3, 5).reshape(b * t, gh * gw, 3 * P * P)
    wpe = sd["vision_model.embeddings.patch_embed.weight"]
    emb = patches @ wpe.reshape(wpe.shape[0], -1).T                    # (F, N, D)
    cls = np.broadcast_to(sd["vision_model.embeddings.cls_token"], (b * t, 1, emb.shape[-1]))
    h = np.concatenate([cls, emb], axis=1) + sd["vision_model.embeddings.position_embedding"]
    h = _ln(h, sd, "vision_model.embeddings.pre_layernorm", 1e-6)
    d = h.shape[-1]
    L = h.shape[1]
    h = h.reshape(b, t, L, d)
    hd = d // HV
    for i in range(LV):
        pre = f"vision_model.encoder.layers.{i}"
        if t > 1:
            h = h + ref_temporal(h, sd, pre)                          # doubles the CLS token, as the reference does
        h = h.reshape(b * t, L, d)
        r = h
        y = _ln(h, sd, f"{pre}.input_layernorm", 1e-6)
        qkv = _linear(y, sd, f"{pre}.self_attn.query_key_value").reshape(b * t, L, HV, 3, hd)
        q, k, v = (qkv[..., j, :].transpose(0, 2, 1, 3) for j in range(3))   # (F, H, L, hd)
        att = _softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd))
        o = (att @ v).transpose(0, 2, 1, 3).reshape(b * t, L, d)
        h = _linear(o, sd, f"{pre}.self_attn.dense") + r
        r = h
        y = _ln(h, sd, f"{pre}.post_attention_layernorm", 1e-6)
        y = _linear(_quick_gelu(_linear(y, sd, f"{pre}.mlp.fc1")), sd, f"{pre}.mlp.fc2")
        h = (y + r).reshape(b, t, L, d)
    return _ln(h, sd, "vision_model.post_layernorm", 1e-6)


def ref_abstractor(features, sd):
    """(B, T, N+1, Dv) features, all frames valid -> (B, Nq+1, D_llm)."""
    sd = {k: np.asarray(a, np.float64) for k, a in sd.items()}
    b, t, L, dv = features.shape
    qt = sd["query_tokens"]
    if t > 1:
        qt = np.concatenate([qt, sd["temporal_query_tokens"]], axis=1)
    Q = np.broadcast_to(qt, (b, *qt.shape[1:]))
    V = features.reshape(b, t * L, dv)
    hd = DA // HA

    def heads(x):
        return x.reshape(b, x.shape[1], HA, hd).transpose(0, 2, 1, 3)

    for i in range(LA):
        pre = f"abstractor.encoder.layers.{i}.crossattention"
        q = _ln(Q, sd, f"{pre}.norm1", 1e-5)
        kin = _ln(V, sd, f"{pre}.normk", 1e-5)
        kv = np.concatenate([q, kin], axis=1)
        qh = heads(_linear(q, sd, f"{pre}.attention.query"))
        kh = heads(_linear(kv, sd, f"{pre}.attention.key"))
        vh = heads(_linear(kv, sd, f"{pre}.attention.value"))
        att = _softmax(qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(hd))
        o = (att @ vh).transpose(0, 2, 1, 3).reshape(b, -1, DA)
        x = q + _linear(o, sd, f"{pre}.output.out_proj")              # residual on the NORMED queries
        y = _ln(x, sd, f"{pre}.output.norm2", 1e-5)
        y = _silu(_linear(y, sd, f"{pre}.output.mlp.w1")) * _linear(y, sd, f"{pre}.output.mlp.w3")
        y = _ln(y, sd, f"{pre}.output.mlp.ffn_ln", 1e-6)
        Q = x + _linear(y, sd, f"{pre}.output.mlp.w2")
    out = _linear(Q[:, :NQ], sd, "abstractor.visual_fc")
    if t > 1:
        out = out + _linear(Q[:, NQ:], sd, "abstractor.temporal_visual_fc")
    eos = np.broadcast_to(sd["abstractor.vit_eos"], (b, 1, out.shape[-1]))
    return np.concatenate([out, eos], axis=1)


def ref_model(frames_u8, sd):
    feats = ref_vision(frames_u8, sd)
    return feats, ref_abstractor(feats, sd)


# ----------------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state_dict():
    return make_state_dict(0)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, state_dict):
    src = write_checkpoint(tmp_path_factory.mktemp("mplug_owl"), state_dict)
    return load_mplug_owl(src)


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(B, T, IMG, IMG, 3), dtype=np.uint8)


@nnx.jit
def _run(model, frames, mask):
    """Our model, jitted once per input signature: (vision features, video tokens)."""
    return model.vision_model(frames, mask).last_hidden_state, model(frames, mask)


def run_model(model, frames, mask=None):
    feats, tokens = _run(model, frames, mask)
    return np.asarray(feats), np.asarray(tokens)


def _maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------------


def test_config_mapping(loaded):
    cfg, _ = loaded
    assert cfg == model_config_from_mplug(HF_CONFIG)
    assert cfg.vision.hidden_size == DV and cfg.vision.num_layers == LV and cfg.vision.num_heads == HV
    assert cfg.abstractor.intermediate_size == FA == 256
    assert cfg.abstractor.num_query_tokens == NQ and cfg.llm_hidden_size == D_LLM


def test_matches_reference(loaded, state_dict, frames):
    _, model = loaded
    ref_feats, ref_tokens = ref_model(frames, state_dict)
    feats, tokens = run_model(model, frames)
    assert feats.shape == (B, T, N + 1, DV)
    assert tokens.shape == (B, NQ + 1, D_LLM)
    assert feats.dtype == np.float32 and tokens.dtype == np.float32
    d_feats, d_tokens = _maxdiff(feats, ref_feats), _maxdiff(tokens, ref_tokens)
    print(f"\n[mplug_owl T={T}] vision features max|diff| = {d_feats:.3e} (max|ref| = {np.abs(ref_feats).max():.2f}); "
          f"video tokens max|diff| = {d_tokens:.3e} (max|ref| = {np.abs(ref_tokens).max():.2f})")
    assert d_feats <= TOL
    assert d_tokens <= TOL
    # the temporal adapter and the temporal queries are really exercised: dropping them changes the output a lot
    no_temporal = {k: (np.zeros_like(a) if ".temporal.up_proj." in k else a) for k, a in state_dict.items()}
    assert _maxdiff(ref_vision(frames, no_temporal), ref_feats) > 1e-2
    no_tq = dict(state_dict, temporal_query_tokens=np.zeros_like(state_dict["temporal_query_tokens"]))
    assert _maxdiff(ref_abstractor(ref_feats, no_tq), ref_tokens) > 1e-2


def test_single_frame(loaded, state_dict, frames):
    _, model = loaded
    one = frames[:, :1]
    ref_feats, ref_tokens = ref_model(one, state_dict)
    feats, tokens = run_model(model, one)
    assert tokens.shape == (B, NQ + 1, D_LLM)
    d_feats, d_tokens = _maxdiff(feats, ref_feats), _maxdiff(tokens, ref_tokens)
    print(f"\n[mplug_owl T=1] vision features max|diff| = {d_feats:.3e}; video tokens max|diff| = {d_tokens:.3e}")
    assert d_feats <= TOL
    assert d_tokens <= TOL


def test_frame_mask_equals_dropping_padded_frames(loaded, state_dict, frames):
    _, model = loaded
    mask = np.array([[True, True, True, False], [True, True, False, False]])
    feats, tokens = run_model(model, frames, mask)
    diffs, feat_diffs = [], []
    for b in range(B):
        valid = frames[b:b + 1, mask[b]]
        ref_feats, ref_tokens = ref_model(valid, state_dict)
        diffs.append(_maxdiff(tokens[b:b + 1], ref_tokens))
        # the valid frames' features do not see the padded ones either (zeroed in the temporal conv)
        feat_diffs.append(_maxdiff(feats[b:b + 1, mask[b]], ref_feats))
    print(f"\n[mplug_owl mask] per sample (valid frames {mask.sum(1).tolist()}): video tokens max|diff| = "
          + ", ".join(f"{d:.3e}" for d in diffs) + "; valid-frame features max|diff| = "
          + ", ".join(f"{d:.3e}" for d in feat_diffs))
    assert max(diffs) <= TOL
    assert max(feat_diffs) <= TOL
    # and the mask matters: the unmasked output differs
    assert _maxdiff(run_model(model, frames)[1], tokens) > 1e-3


def test_layernorm_eps(tmp_path, state_dict, frames):
    """Same comparison with tiny LayerNorm inputs: the eps of every LayerNorm (1e-6 vision / ffn_ln, 1e-5 torch default
    for temporal.ln, norm1, normk, norm2) now moves the output far beyond the tolerance, so it is checked too."""
    sd = small_streams(state_dict)
    _, model = load_mplug_owl(write_checkpoint(tmp_path / "small", sd))
    diffs = {}
    for name, x in (("T=4", frames), ("T=1", frames[:, :1])):
        ref_feats, ref_tokens = ref_model(x, sd)
        feats, tokens = run_model(model, x)
        # features are ~1e-2 here (post_layernorm scaled down), so compare them relative to their size
        diffs[name] = (_maxdiff(feats, ref_feats) / np.abs(ref_feats).max(), _maxdiff(tokens, ref_tokens))
    print("\n[mplug_owl small streams] " + "; ".join(
        f"{n}: features max|diff|/max|ref| = {f:.3e}, video tokens max|diff| = {t:.3e}" for n, (f, t) in diffs.items()))
    for f, t in diffs.values():
        assert f <= TOL
        assert t <= TOL


def test_export_round_trip(loaded, state_dict):
    _, model = loaded
    out = export_mplug_owl(model)
    assert sorted(out) == sorted(state_dict)
    for k, a in state_dict.items():
        got = np.asarray(out[k])
        assert got.shape == a.shape, k
        assert got.dtype == a.dtype, k
        assert np.array_equal(got, a), k


def test_mismatch_is_reported(tmp_path, state_dict):
    sd = dict(state_dict)
    missing = "vision_model.encoder.layers.1.mlp.fc2.bias"
    renamed_from = "abstractor.encoder.layers.0.crossattention.output.norm2.weight"
    renamed_to = "abstractor.encoder.layers.0.crossattention.output.norm_2.weight"
    bad = "vision_model.post_layernorm.bias"
    del sd[missing]
    sd[renamed_to] = sd.pop(renamed_from)
    sd[bad] = np.zeros(DV + 3, np.float32)
    src = write_checkpoint(tmp_path / "bad", sd)
    with pytest.raises(CheckpointMismatchError) as info:
        load_mplug_owl(src)
    msg = str(info.value)
    print(f"\n[mplug_owl mismatch]\n{msg}")
    section = {key: next((ln for ln in msg.splitlines() if key in ln.lower()), "")
               for key in ("missing", "unexpected", "shape")}
    assert missing in section["missing"]
    assert renamed_from in section["missing"]
    assert renamed_to in section["unexpected"]
    assert bad in section["shape"]
    assert str((DV,)) in section["shape"] and str((DV + 3,)) in section["shape"]
    # every problem is reported at once, and nothing else is
    assert missing not in section["unexpected"] and renamed_to not in section["missing"]


def _tiny_hf_llama(seed=2):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=D_LLM, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return cfg, LlamaForCausalLM(cfg).eval()


def _with_language_model(state_dict):
    """A full mPLUG-Owl checkpoint: our random vision/abstractor state dict + a tiny HF LLaMA under language_model."""
    hf_cfg, llama = _tiny_hf_llama()
    sd = dict(state_dict)
    sd.update({f"language_model.{k}": v.numpy() for k, v in llama.state_dict().items()})
    config = dict(HF_CONFIG, text_config={**hf_cfg.to_dict(), "model_type": "llama"})
    return sd, config, llama


def test_full_checkpoint_converts_the_language_model(tmp_path, state_dict, frames):
    torch = pytest.importorskip("torch")
    sd, config, llama = _with_language_model(state_dict)
    cfg, model = load_mplug_owl(write_checkpoint(tmp_path / "full", sd, config))
    assert cfg.kind == "gpt4video" and cfg.llm.num_kv_heads == 2
    model.eval()
    ids = np.random.default_rng(0).integers(0, 96, (2, 12))
    ours, _ = model.language_model(ids)
    with torch.no_grad():
        ref = llama(torch.from_numpy(ids)).logits.numpy()
    diff = _maxdiff(np.asarray(ours), ref)
    print(f"mPLUG-Owl language_model vs HF LlamaForCausalLM logits: {diff:.2e}")
    assert diff <= 1e-4
    # the video side is untouched by the LLM's presence, and export gives back every tensor bit for bit
    out = export_mplug_owl(model)
    assert sorted(out) == sorted(sd)
    assert all(np.array_equal(out[k], sd[k]) for k in sd)


def test_cli_converts_and_g4v_jax_load_matches(tmp_path, state_dict, frames):
    import subprocess
    import sys
    from pathlib import Path

    import g4v_jax

    sd, config, _ = _with_language_model(state_dict)
    src = write_checkpoint(tmp_path / "src", sd, config)
    dst = tmp_path / "dst"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "convert.mplug_owl", str(src), str(dst)], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "g4v_jax.load(" in proc.stdout
    model = g4v_jax.load(dst)
    diff = _maxdiff(np.asarray(model.encode_videos(frames)), ref_model(frames, sd)[1])
    print(f"CLI-converted model vs NumPy reference: {diff:.2e}")
    assert diff <= 1e-4


def test_abstractor_mlp_width():
    assert abstractor_mlp_width(4096) == 2816    # mPLUG-Owl's released config: 4096 -> 2730 -> 2816
    assert abstractor_mlp_width(2816) == 2816
    assert abstractor_mlp_width(384) == 256


@pytest.mark.parametrize(
    "key, bad_shape",
    [
        ("vision_model.encoder.layers.0.self_attn.query_key_value.weight", (99, 32)),  # would not even reshape
        ("vision_model.encoder.layers.1.temporal.conv.weight", (16, 1, 5, 1, 1)),
        ("vision_model.embeddings.patch_embed.weight", (32, 14, 14, 3)),  # channels-last: same size, wrong layout
        ("vision_model.embeddings.cls_token", (32,)),  # would reshape into place silently
        ("abstractor.visual_fc.weight", (64, 33)),
    ],
)
def test_wrong_layouts_are_reported_in_checkpoint_terms(tmp_path, key, bad_shape):
    sd = make_state_dict(0)
    good_shape = sd[key].shape
    sd[key] = np.zeros(bad_shape, np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        load_mplug_owl(write_checkpoint(tmp_path / "ckpt", sd))
    assert f"{key}: checkpoint {bad_shape}, model needs {good_shape}" in str(e.value)


def test_the_converted_checkpoint_carries_mplug_owls_preprocessing():
    from g4v_jax.convert.mplug_owl import model_config_from_mplug

    hf = {"vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 4},
          "visual_abstractor_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                                       "intermediate_size": 64},
          "text_config": {"hidden_size": 64}}
    video = model_config_from_mplug(hf).video
    assert (video.sampling, video.resize) == ("mplug_owl", "squash")
