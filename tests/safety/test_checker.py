"""SD safety checker: parity with diffusers' StableDiffusionSafetyChecker (scores, special-care adjustment, flags),
the converter (both checkpoint layouts, mismatch errors), GPT4Video's per-video rule and corrupt input."""

import json
import shutil

import numpy as np
import pytest

from g4v_jax.models.clip_vit import CLIP_MEAN, CLIP_STD
from g4v_jax.safety import SafetyChecker, flag_video, load_safety_checker, safety_scores
from g4v_jax.weights import CheckpointMismatchError, read_safetensors, write_safetensors

torch = pytest.importorskip("torch")
sc = pytest.importorskip("diffusers.pipelines.stable_diffusion.safety_checker")

SIZE = 56
N = 6


def _pixels(images):
    return torch.from_numpy(((images / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32).transpose(0, 3, 1, 2))


def _torch_cosines(model, images):
    """diffusers' forward up to its cosines, from the module's own submodules."""
    with torch.no_grad():
        embeds = model.visual_projection(model.vision_model(_pixels(images))[1])
        special = sc.cosine_distance(embeds, model.special_care_embeds).float().numpy()
        concept = sc.cosine_distance(embeds, model.concept_embeds).float().numpy()
    return embeds, special, concept


def _diffusers_scores(special_cos, concept_cos, special_w, concept_w):
    """diffusers' forward loop, transliterated (Python round on NumPy float32 scalars, thresholds via .item())."""
    out = []
    for i in range(special_cos.shape[0]):
        adjustment, special, concept = 0.0, [], []
        for k in range(special_cos.shape[1]):
            special.append(round(special_cos[i][k] - float(special_w[k]) + adjustment, 3))
            if special[-1] > 0:
                adjustment = 0.01
        for k in range(concept_cos.shape[1]):
            concept.append(round(concept_cos[i][k] - float(concept_w[k]) + adjustment, 3))
        out.append((np.array(special, np.float32), np.array(concept, np.float32)))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random diffusers checker whose thresholds are placed around the actual cosines of N test images:
    image A fires special concept 0 and is flagged only thanks to the +0.01 adjustment (concept 1 sits 0.005 under
    its threshold); image B is flagged by concept 0; the rest are not flagged."""
    from transformers import CLIPConfig

    torch.manual_seed(0)
    cfg = CLIPConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=SIZE, patch_size=14),
                     projection_dim=16)
    model = sc.StableDiffusionSafetyChecker(cfg).eval()
    images = np.random.default_rng(0).integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # LayerNorm scale/bias mix-ups must not hide behind ones and zeros
                p.add_(0.1 * torch.randn_like(p))
        model.concept_embeds.copy_(torch.randn(17, 16))
        model.special_care_embeds.copy_(torch.randn(3, 16))
        embeds, special, concept = _torch_cosines(model, images)
        a, b = 0, int(np.argsort(concept[:, 0])[-1])
        if b == a:  # pick a concept column whose top image is not A
            col = next(j for j in range(17) if int(np.argmax(concept[:, j])) != a)
            model.concept_embeds[[0, col]] = model.concept_embeds[[col, 0]].clone()
        model.special_care_embeds[0] = embeds[a]
        model.special_care_embeds[1] = embeds[a]
        model.concept_embeds[1] = embeds[a]
        _, special, concept = _torch_cosines(model, images)
        b = int(np.argmax(concept[:, 0]))
        top2 = np.sort(concept[:, 0])[-2:]
        others_s0 = np.sort(special[:, 0])[-2]
        sw = special.max(0) + 0.05
        sw[0] = (special[a, 0] + others_s0) / 2  # only A fires special 0
        sw[1] = special[a, 1] + 0.005  # A: -0.005 raw, +0.005 after the adjustment from special 0
        cw = concept.max(0) + 0.05  # nobody, adjustment or not
        cw[0] = top2.mean()  # only B
        cw[1] = concept[a, 1] + 0.005  # A: -0.005 raw -> flagged only with the adjustment
        model.special_care_embeds_weights.copy_(torch.from_numpy(sw.astype(np.float32)))
        model.concept_embeds_weights.copy_(torch.from_numpy(cw.astype(np.float32)))
    root = tmp_path_factory.mktemp("sd_safety")
    model.save_pretrained(root / "hf")
    from g4v_jax.convert.sd_safety_checker import main

    main([str(root / "hf"), str(root / "ours")])
    return dict(model=model, images=images, a=a, b=b, root=root, checker=load_safety_checker(root / "ours"))


def test_parity_with_diffusers(setup):
    model, images, checker = setup["model"], setup["images"], setup["checker"]
    ours = checker.scores(images)
    _, special_cos, concept_cos = _torch_cosines(model, images)
    cos_diff = max(np.abs(ours["special_cos"] - special_cos).max(), np.abs(ours["concept_cos"] - concept_cos).max())
    sw, cw = model.special_care_embeds_weights.detach().numpy(), model.concept_embeds_weights.detach().numpy()
    reference = _diffusers_scores(special_cos, concept_cos, sw, cw)
    ref_special = np.stack([s for s, _ in reference])
    ref_concept = np.stack([c for _, c in reference])
    # raw scores must be clear of the flag boundary (round(x, 3) > 0 <=> x > 5e-4) for the comparison to mean much
    adj = np.where((ref_special > 0).any(1), np.float32(0.01), np.float32(0))
    raw = np.concatenate([special_cos - sw, concept_cos - cw + adj[:, None]], axis=1)
    assert np.abs(raw - 5e-4).min() > 1e-4
    score_diff = max(np.abs(ours["special_scores"] - ref_special).max(),
                     np.abs(ours["concept_scores"] - ref_concept).max())
    print(f"safety checker parity: cosines max|diff| {cos_diff:.2e}, rounded scores max|diff| {score_diff:.1e}")
    assert cos_diff <= 1e-4
    assert score_diff <= 1e-3 + 1e-6  # at most one rounding step, where a cosine sits on a half-way point

    # the real diffusers forward (what the pipelines call) gives the same flags
    with torch.no_grad():
        _, has_nsfw = model(clip_input=_pixels(images), images=np.zeros((N, SIZE, SIZE, 3), np.float32))
    assert ours["flagged"].tolist() == list(has_nsfw)
    a, b = setup["a"], setup["b"]
    expected = np.zeros(N, bool)
    expected[[a, b]] = True
    assert ours["flagged"].tolist() == expected.tolist()  # some flagged, some not

    # the special-care path: A fires special 0; the +0.01 reaches its later special scores and its concepts, and is
    # what flags it (concept 1 is 0.005 under its threshold)
    assert ours["special_scores"][a, 0] > 0 and ours["special_scores"][a, 1] == pytest.approx(0.005, abs=1e-6)
    assert concept_cos[a, 1] - cw[1] < 0 and ours["concept_scores"][a, 1] == pytest.approx(0.005, abs=1e-6)
    assert (ours["special_scores"][np.arange(N) != a] <= 0).all()


def test_rounding_and_adjustment_are_diffusers_exactly():
    """The decision rule alone, on random cosines around the thresholds: bit-identical to diffusers' loop."""
    rng = np.random.default_rng(1)
    special_cos = rng.uniform(0.0, 0.3, (64, 3)).astype(np.float32)
    concept_cos = rng.uniform(0.0, 0.2, (64, 17)).astype(np.float32)
    special_cos[:8, 0] = (np.arange(8) * 1e-3 + 0.1005).astype(np.float32)  # near half-way points
    concept_cos[8:16, 0] = (np.arange(8) * 1e-3 + 0.1855).astype(np.float32)
    sw = np.full(3, 0.2, np.float32)
    cw = np.full(17, 0.25, np.float32)
    cw[0] = 0.19  # only concept 0 can fire, and mostly only with the adjustment
    ours = safety_scores(special_cos, concept_cos, sw, cw)
    reference = _diffusers_scores(special_cos, concept_cos, sw, cw)
    assert np.array_equal(ours["special_scores"], np.stack([s for s, _ in reference]))
    assert np.array_equal(ours["concept_scores"], np.stack([c for _, c in reference]))
    assert np.array_equal(ours["flagged"], np.stack([(c > 0).any() for _, c in reference]))
    assert 0 < ours["flagged"].sum() < 64 and (ours["special_scores"] > 0).any(1).sum() > 0
    never_special = safety_scores(special_cos, concept_cos, np.full(3, 2.0, np.float32), cw)
    assert never_special["flagged"].sum() < ours["flagged"].sum()  # the +0.01 adjustment flags more images


def test_flag_video_fraction_rule(setup):
    checker, images, a, b = setup["checker"], setup["images"], setup["a"], setup["b"]
    clean = [i for i in range(N) if i not in (a, b)]

    def video(num_flagged):
        picks = [a, b] * 5
        return images[picks[:num_flagged] + [clean[i % len(clean)] for i in range(10 - num_flagged)]]

    four, five = flag_video(checker, video(4)), flag_video(checker, video(5))
    assert (four.flagged, four.flagged_frames, four.total) == (False, 4, 10)  # GPT4Video: unsafe when > 4 of 10
    assert (five.flagged, five.flagged_frames, five.total) == (True, 5, 10)
    assert five.frame_flags == (True,) * 5 + (False,) * 5
    assert flag_video(checker, video(1), max_flagged_fraction=0.0).flagged
    # frames of another size are resized and center-cropped to the checker's size first
    wide = np.repeat(np.repeat(video(5), 2, axis=1), 3, axis=2)  # (10, 112, 168, 3)
    assert flag_video(checker, wide).total == 10


def test_corrupt_frames_are_rejected(setup):
    checker = setup["checker"]
    frames = setup["images"][:3].astype(np.float32) / 255.0
    frames[1, 5, 5, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf \(image indices \[1\]\)"):
        checker.scores(frames)
    with pytest.raises(ValueError, match="NaN"):
        flag_video(checker, frames)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        checker.scores(setup["images"][:2].astype(np.float32))
    with pytest.raises(ValueError, match="expects 56x56"):
        checker.scores(np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="empty|no frames"):
        flag_video(checker, np.zeros((0, SIZE, SIZE, 3), np.uint8))


def test_legacy_nested_bin_layout_converts_identically(setup, tmp_path):
    """Released checkpoints (transformers 4) name the tower vision_model.vision_model.* and may ship .bin only."""
    from g4v_jax.convert.sd_safety_checker import load_sd_safety_checker

    src = setup["root"] / "hf"
    sd = {(f"vision_model.{k}" if k.startswith("vision_model.") else k): torch.from_numpy(np.array(v))
          for k, v in read_safetensors(src / "model.safetensors").items()}
    sd["vision_model.vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # an old buffer, ignored
    (tmp_path / "legacy").mkdir()
    torch.save(sd, tmp_path / "legacy" / "pytorch_model.bin")
    shutil.copy(src / "config.json", tmp_path / "legacy" / "config.json")
    legacy = load_sd_safety_checker(tmp_path / "legacy")
    images = setup["images"]
    assert np.array_equal(legacy.scores(images)["concept_cos"], setup["checker"].scores(images)["concept_cos"])


def test_mismatched_checkpoint_names_the_key(setup, tmp_path):
    from g4v_jax.convert.sd_safety_checker import load_sd_safety_checker

    src = setup["root"] / "hf"
    tensors = dict(read_safetensors(src / "model.safetensors"))
    del tensors["special_care_embeds_weights"]
    (tmp_path / "bad").mkdir()
    write_safetensors(tmp_path / "bad" / "model.safetensors", tensors)
    shutil.copy(src / "config.json", tmp_path / "bad" / "config.json")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): special_care_embeds_weights"):
        load_sd_safety_checker(tmp_path / "bad")
    cfg = json.loads((src / "config.json").read_text())
    cfg["projection_dim"] = 8
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match=r"visual_projection\.weight: checkpoint \(16, 32\)"):
        load_sd_safety_checker(tmp_path / "bad")


def test_saved_directory_round_trip_and_errors(setup, tmp_path):
    ours = setup["root"] / "ours"
    meta = json.loads((ours / "safety_checker.json").read_text())
    assert meta["projection_dim"] == 16 and meta["vision"]["image_size"] == SIZE
    assert isinstance(setup["checker"], SafetyChecker) and setup["checker"].image_size == SIZE
    with pytest.raises(FileNotFoundError, match="convert.sd_safety_checker"):
        load_safety_checker(tmp_path)
