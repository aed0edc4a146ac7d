"""The gates: input video detector (10 frames, more than 4 flagged), prompt checks, output video check."""

import numpy as np
import pytest
from flax import nnx

from g4v_jax.config import VisionConfig
from g4v_jax.data.video import synthetic_frames, write_video
from g4v_jax.safety.checker import SafetyChecker
from g4v_jax.safety.gates import (
    keyword_prompt_check, make_output_video_check, make_video_gate, model_prompt_check,
)

VISION = VisionConfig(image_size=28, patch_size=14, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)


def _checker(flag_everything: bool) -> SafetyChecker:
    checker = SafetyChecker(VISION, 8, rngs=nnx.Rngs(params=0))
    # threshold -1 (every cosine exceeds it) flags everything; 1 (no cosine exceeds it) flags nothing
    w = checker.concept_embeds_weights
    w[...] = np.full(w.shape, -1.0 if flag_everything else 1.0, np.float32)
    return checker


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("v") / "clip.mp4"
    write_video(path, synthetic_frames(12, 48, 64))
    return str(path)


def test_input_video_gate(video, tmp_path):
    assert make_video_gate(_checker(True))(video) is True
    assert make_video_gate(_checker(False))(video) is False
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    from g4v_jax.data.video import VideoReadError

    with pytest.raises(VideoReadError, match="broken.mp4"):
        make_video_gate(_checker(False))(str(tmp_path / "broken.mp4"))


def test_output_video_check():
    frames = synthetic_frames(16, 32, 32)
    assert "flagged" in make_output_video_check(_checker(True))(frames)
    assert make_output_video_check(_checker(False))(frames) is None


def test_prompt_checks():
    check = keyword_prompt_check(["gore", "explicit"])
    assert check("a cat playing with a ball") is None
    assert "gore" in check("a scene full of Gore")
    assert check("") == "empty prompt" and check("   ") == "empty prompt"
    assert "10000 characters" in check("x" * 10000)
    assert keyword_prompt_check([])("anything") is None
    by_model = model_prompt_check(lambda q: "I'm sorry, I can't help with that." if "fight" in q else "A cat.")
    assert by_model("two men fight with knives") == "the model judged the prompt unsafe"
    assert by_model("a cat on a sofa") is None and by_model("") == "empty prompt"
