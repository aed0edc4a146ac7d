"""The learned input detector: it learns a visual pattern, round-trips through disk, and plugs into the gates."""

import json

import numpy as np
import pytest

from g4v_jax.data.video import write_video
from g4v_jax.safety.frame_classifier import (load_frame_classifier, save_frame_classifier,
                                             train_frame_classifier)
from g4v_jax.safety.gates import make_video_gate


def _frames(rng, n, hazard):
    out = rng.integers(0, 120, (n, 32, 32, 3), dtype=np.uint8)
    for f in out:  # a few random bright squares, so brightness alone does not give the class away
        for _ in range(2):
            y, x = rng.integers(0, 24, 2)
            f[y:y + 8, x:x + 8] = rng.integers(100, 256, 3)
        if hazard:  # magenta / black diagonal stripes in a random corner
            y, x = rng.choice([0, 22]), rng.choice([0, 22])
            yy, xx = np.mgrid[0:10, 0:10]
            f[y:y + 10, x:x + 10] = np.where(((yy + xx) // 2 % 2 == 0)[..., None], [255, 0, 255], [0, 0, 0])
    return out


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(0)
    x = np.concatenate([_frames(rng, 200, True), _frames(rng, 200, False)])
    y = np.arange(400) < 200
    return train_frame_classifier(x, y, image_size=32, steps=150, seed=0)


def test_learns_the_pattern_on_unseen_frames(trained):
    rng = np.random.default_rng(1)
    test = np.concatenate([_frames(rng, 100, True), _frames(rng, 100, False)])
    flagged = trained.scores(test)["flagged"]
    accuracy = np.mean(flagged == (np.arange(200) < 100))
    print(f"held-out frame accuracy {accuracy:.3f}")
    assert accuracy >= 0.95


def test_round_trip_and_gate(trained, tmp_path):
    rng = np.random.default_rng(2)
    frames = _frames(rng, 8, True)
    d = save_frame_classifier(trained, tmp_path / "det")
    loaded = load_frame_classifier(d)
    np.testing.assert_allclose(loaded.scores(frames)["probability"], trained.scores(frames)["probability"],
                               atol=1e-6)
    # videos at another size go through the gate's resize; more than 40% flagged frames flags the video
    bad, good = tmp_path / "bad.mp4", tmp_path / "good.mp4"
    write_video(bad, np.repeat(np.repeat(_frames(rng, 8, True), 2, 1), 2, 2), fps=8)
    write_video(good, np.repeat(np.repeat(_frames(rng, 8, False), 2, 1), 2, 2), fps=8)
    gate = make_video_gate(loaded)
    assert gate(str(bad)) and not gate(str(good))


def test_bad_inputs(tmp_path, trained):
    with pytest.raises(ValueError, match="both classes"):
        train_frame_classifier(np.zeros((4, 32, 32, 3), np.uint8), np.ones(4, bool), steps=1)
    with pytest.raises(ValueError, match="uint8"):
        train_frame_classifier(np.zeros((4, 32, 32, 3), np.float32), np.ones(4, bool), steps=1)
    with pytest.raises(FileNotFoundError, match="frame classifier"):
        load_frame_classifier(tmp_path)
    d = save_frame_classifier(trained, tmp_path / "det")
    cfg = json.loads((d / "frame_classifier.json").read_text())
    (d / "frame_classifier.json").write_text(json.dumps({**cfg, "channels": [8, 32]}))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_frame_classifier(d)
