"""Every text-to-video family behind ``make_backend("diffusers", path=...)``, on tiny random pipelines built offline.

For each family (``t2v.families.FAMILIES``; each one's pipeline class must exist in the pinned diffusers, so none is
skipped): load the saved directory, generate two prompts on the CPU with a request that breaks the family's frame and
size rules, check the rounding, the seeds, the mp4 files (frame count, fps) and that the safety output check sees the
frames. Then the rules' arithmetic, strict mode, prompt templates and AnimateDiff's frame limit.
"""

import logging
from fractions import Fraction

import av
import numpy as np
import pytest

from g4v_jax.tags import parse_video_tags
from g4v_jax.t2v import T2VBackend, T2VError, T2VSettings, make_backend, render_requests
from g4v_jax.t2v.families import FAMILIES, GENERIC, Family, Rules, fit_settings, read_rules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from g4v_jax.t2v.tiny import TINY_BUILDERS, build_tiny_pipeline  # noqa: E402  (needs torch)

ANSWER = "Two clips: <video1>a red panda eating bamboo</video1> and <video2>waves on a beach at night</video2>."

# family -> (a request that breaks its rules where it has any, what its rules make of it); sizes near the tiny
# pipelines' own so that each runs in well under a second on the CPU
CASES = {
    "zeroscope": (T2VSettings(num_frames=6, height=30, width=34, steps=2), (6, 32, 32)),
    "animatediff": (T2VSettings(num_frames=6, height=30, width=34, steps=2), (6, 32, 32)),
    "wan": (T2VSettings(num_frames=8, height=20, width=30, steps=2), (9, 16, 32)),
    "ltx": (T2VSettings(num_frames=12, height=40, width=60, steps=2), (9, 32, 64)),
    "cogvideox": (T2VSettings(num_frames=12, height=20, width=24, steps=2), (9, 16, 32)),
}


def test_every_family_has_a_pipeline_class_a_tiny_build_and_a_case():
    assert set(FAMILIES) == set(TINY_BUILDERS) == set(CASES)
    for family in FAMILIES.values():
        for cls in family.pipelines:
            assert hasattr(diffusers, cls), f"{family.name}: diffusers {diffusers.__version__} has no {cls}"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    return request.param, build_tiny_pipeline(request.param, tmp_path_factory.mktemp(f"tiny_{request.param}"))


def _checker(flag_everything: bool):
    """A tiny random SD-style safety checker whose thresholds flag every frame or none."""
    from flax import nnx

    from g4v_jax.config import VisionConfig
    from g4v_jax.safety.checker import SafetyChecker

    vision = VisionConfig(image_size=28, patch_size=14, hidden_size=16, intermediate_size=32, num_layers=1,
                          num_heads=2)
    checker = SafetyChecker(vision, 8, rngs=nnx.Rngs(params=0))
    w = checker.concept_embeds_weights
    w[...] = np.full(w.shape, -1.0 if flag_everything else 1.0, np.float32)
    return checker


def test_family_renders_by_its_rules(family_dir, tmp_path, caplog):
    from g4v_jax.safety.gates import make_output_video_check

    name, path = family_dir
    family = FAMILIES[name]
    backend = make_backend("diffusers", path=path, device="cpu")
    assert isinstance(backend, T2VBackend) and backend.family is family
    assert type(backend.pipeline).__name__ in family.pipelines
    assert backend.default_settings == family.settings and backend.fps == family.fps
    request, (frames, height, width) = CASES[name]

    with caplog.at_level(logging.WARNING, logger="g4v_jax.t2v.diffusers_backend"):
        videos = backend.generate(["a red panda", "waves at night"], request)
    assert videos.dtype == np.uint8 and videos.shape == (2, frames, height, width, 3)
    assert videos.std() > 1 and not np.array_equal(videos[0], videos[1])
    moved = (frames, height, width) != (request.num_frames, request.height, request.width)
    assert moved == any(name in r.getMessage() and "->" in r.getMessage() for r in caplog.records)
    # per-prompt generators: a prompt's video does not depend on the rest of its batch
    alone = backend.generate(["waves at night"], request)[0]
    assert np.abs(alone.astype(int) - videos[1]).max() <= 1

    # the output check sees exactly the generated frames; a flagged video is withheld, an unflagged one written
    seen = []
    passing = make_output_video_check(_checker(False))

    def check(video):
        seen.append(video.copy())
        return passing(video)

    requests = parse_video_tags(ANSWER)
    rendered = render_requests(backend, requests, request, tmp_path / "ok", check_video=check)
    assert [r.error for r in rendered] == [None, None], rendered
    assert len(seen) == 2 and all(v.shape == (frames, height, width, 3) for v in seen)
    assert np.abs(seen[0].astype(int) - backend.generate([requests[0].prompt], request)[0]).max() <= 1
    for r in rendered:
        # no template: the caption as the LLM wrote it, cut to whole words where the (tiny) text encoder is shorter
        sent, truncation = backend.adapt_prompt(r.request.prompt)
        assert r.sent_prompt == sent and r.request.prompt.startswith(sent)
        assert r.notes == tuple(n for n in r.notes if "->" in n) + truncation
        assert any("->" in n for n in r.notes) == moved
        with av.open(str(r.path)) as container:
            stream = container.streams.video[0]
            assert stream.average_rate == Fraction(family.fps)
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert len(decoded) == frames and decoded[0].shape == (height, width, 3)
    withheld = render_requests(backend, requests, request, tmp_path / "flagged",
                               check_video=make_output_video_check(_checker(True)))
    assert all(r.path is None and r.error.startswith("withheld:") for r in withheld)
    assert not (tmp_path / "flagged").exists() or not any((tmp_path / "flagged").iterdir())


def test_strict_mode_names_the_rule(family_dir):
    name, path = family_dir
    backend = make_backend("diffusers", path=path, device="cpu", strict=True)
    request, expected = CASES[name]
    with pytest.raises(T2VError, match=rf"{name}: .*multiples of"):
        backend.generate(["a red panda"], request)
    ok = T2VSettings(num_frames=expected[0], height=expected[1], width=expected[2], steps=1)
    assert backend.generate(["a red panda"], ok).shape == (1, *expected, 3)


# --------------------------------------------------------------------------------------------------------------------
# the rules' arithmetic, on fake pipelines
# --------------------------------------------------------------------------------------------------------------------


class _Config(dict):
    __getattr__ = dict.get


class _Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_rules_are_read_from_the_pipeline_and_fall_back_to_the_documented_numbers():
    wan = FAMILIES["wan"]
    pipe = _Obj(vae_scale_factor_temporal=4, vae_scale_factor_spatial=16,
                transformer=_Obj(config=_Config(patch_size=(1, 2, 2))))
    assert read_rules(wan, pipe) == Rules("wan", frame_step=4, size_multiple=32)
    assert read_rules(wan, _Obj()) == Rules("wan", frame_step=4, size_multiple=16)  # nothing exposed: the docs
    cog = FAMILIES["cogvideox"]  # check_inputs asks for 8, the 2x2 patches for 16
    pipe = _Obj(vae_scale_factor_temporal=4, vae=_Obj(num_latent_frames_batch_size=2), vae_scale_factor_spatial=8,
                transformer=_Obj(config=_Config(patch_size=2)))
    assert read_rules(cog, pipe) == Rules("cogvideox", frame_step=8, size_multiple=16)
    ad = FAMILIES["animatediff"]
    pipe = _Obj(vae_scale_factor=8, unet=_Obj(config=_Config(motion_max_seq_length=32)))
    assert read_rules(ad, pipe) == Rules("animatediff", frame_step=1, size_multiple=8, max_frames=32)


@pytest.mark.parametrize("rules, asked, fitted", [
    (Rules("wan", 4, 16), (81, 480, 832), (81, 480, 832)),
    (Rules("wan", 4, 16), (24, 320, 576), (25, 320, 576)),  # the paper's ZeroScope settings sent to Wan
    (Rules("wan", 4, 16), (2, 8, 8), (1, 16, 16)),
    (Rules("ltx", 8, 32), (12, 500, 700), (9, 512, 704)),
    (Rules("ltx", 8, 32), (13, 512, 704), (17, 512, 704)),  # ties go up
    (Rules("cogvideox", 8, 16), (21, 480, 720), (25, 480, 720)),
    (Rules("animatediff", 1, 8, max_frames=32), (40, 512, 512), (32, 512, 512)),
    (Rules("generic", 1, 1), (7, 33, 35), (7, 33, 35)),
])
def test_fit_settings(rules, asked, fitted):
    settings = T2VSettings(num_frames=asked[0], height=asked[1], width=asked[2])
    out, notes = fit_settings(settings, rules)
    assert (out.num_frames, out.height, out.width) == fitted
    assert out.steps == settings.steps and out.seed == settings.seed
    assert len(notes) == (fitted[0] != asked[0]) + (fitted[1:] != asked[1:])
    if notes:
        with pytest.raises(ValueError, match="would be needed"):
            fit_settings(settings, rules, strict=True)


def test_families_defaults_obey_their_own_rules():
    for family in FAMILIES.values():
        rules = Rules(family.name, family.frame_step, family.size_multiple)
        assert fit_settings(family.settings, rules) == (family.settings, ()), family.name
    assert GENERIC.size_multiple == 1 and isinstance(GENERIC, Family)


# --------------------------------------------------------------------------------------------------------------------
# prompts, AnimateDiff's frame limit, bad options
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return build_tiny_pipeline("wan", tmp_path_factory.mktemp("wan"))


def test_prompt_template_and_reported_truncation(wan_dir, tmp_path):
    backend = make_backend("diffusers", path=wan_dir, device="cpu", prompt_prefix="a film of ",
                           prompt_suffix=", at night", max_prompt_tokens=16)
    tokens = lambda text: len(backend.pipeline.tokenizer(text).input_ids)  # noqa: E731
    short, notes = backend.adapt_prompt("a red panda")
    assert short == "a film of a red panda, at night" and notes == ()
    long_caption = "a red panda eating bamboo on the beach and the sea and waves and a blue circle spins"
    sent, notes = backend.adapt_prompt(long_caption)
    assert sent.startswith("a film of a red panda") and sent.endswith(", at night") and tokens(sent) <= 16
    assert tokens(backend.template.apply(long_caption)) > 16
    assert len(notes) == 1 and "truncated to 16 tokens" in notes[0] and "spins" in notes[0]
    rendered = render_requests(backend, parse_video_tags(f"<video>{long_caption}</video>"),
                               T2VSettings(num_frames=5, height=16, width=16, steps=1), tmp_path)
    (r,) = rendered
    assert r.ok and r.sent_prompt == sent and any("truncated" in n for n in r.notes)
    with pytest.raises(ValueError, match="prefix and suffix alone"):
        make_backend("diffusers", path=wan_dir, device="cpu", prompt_prefix="the " * 20, max_prompt_tokens=8)


def test_wan_keeps_its_vae_in_float32_and_takes_its_options(wan_dir):
    backend = make_backend("diffusers", path=wan_dir, device="cpu", dtype="bfloat16", vae_tiling=True,
                           vae_slicing=True, scheduler="unipc")
    assert backend.pipeline.transformer.dtype == torch.bfloat16 and backend.pipeline.vae.dtype == torch.float32
    assert backend.pipeline.vae.use_tiling and backend.pipeline.vae.use_slicing
    assert type(backend.pipeline.scheduler).__name__ == "UniPCMultistepScheduler"
    videos = backend.generate(["a red panda"], T2VSettings(num_frames=5, height=16, width=16, steps=2))
    assert videos.shape == (1, 5, 16, 16, 3)
    with pytest.raises(ValueError, match="unknown text-to-video family 'sora'"):
        make_backend("diffusers", path=wan_dir, family="sora")
    with pytest.raises(ValueError, match="cpu_offload"):
        make_backend("diffusers", path=wan_dir, cpu_offload="always")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_backend("diffusers", path=wan_dir, device="cpu", cpu_offload="sequential")


def test_animatediff_frames_beyond_the_motion_module_are_capped(tmp_path):
    path = build_tiny_pipeline("animatediff", tmp_path)
    backend = make_backend("diffusers", path=path, device="cpu")
    assert backend.rules.max_frames == 32
    plan = backend.plan(["a red panda"], T2VSettings(num_frames=40, height=32, width=32, steps=1))
    assert plan.settings.num_frames == 32 and "num_frames 40 -> 32" in plan.notes[0][0]
    strict = make_backend("diffusers", path=path, device="cpu", strict=True)
    with pytest.raises(T2VError, match="at most 32"):
        strict.generate(["a red panda"], T2VSettings(num_frames=40, height=32, width=32, steps=1))
