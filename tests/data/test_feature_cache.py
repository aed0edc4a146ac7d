"""The vision-feature cache's keys."""

import os

from g4v_jax.data.feature_cache import entry_path


def test_one_video_spelled_two_ways_has_one_entry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    key = entry_path("cache", "runs/world/data/videos/a.mp4")
    assert entry_path("cache", "runs/exp/x/../../world/data/videos/a.mp4") == key
    assert entry_path("cache", os.path.join(str(tmp_path), "runs/world/data/videos/a.mp4")) == key
    assert entry_path("cache", "runs/world/data/videos/b.mp4") != key
