"""The world's text-to-video backend ``"world"``: renders the caption the LLM writes between video tags.

    import g4v_jax.world.backend  # registers "world"
    backend = make_backend("world")
    videos = backend.generate(["a big green square spins on a black background"], T2VSettings(num_frames=8,
                              height=64, width=64))   # uint8 (1, 8, 64, 64, 3)

Each prompt is parsed with ``scene.parse_caption`` and rendered with ``scene.render`` at ``settings.num_frames``
frames; the square scene is ``min(height, width)`` pixels and is centred on a ``height`` x ``width`` canvas of its
background colour (the world is square; letterboxing keeps every object in view). Positions come from
``settings.seed`` alone, so a prompt's video does not depend on the other prompts of its batch; steps, guidance and
the negative prompt mean nothing here and are ignored. A prompt that is not a caption of the world raises
``T2VError`` naming it.

Generation-tag accuracy (``match_request``): a generated prompt counts as correct when it parses to the requested
scene, objects in any order (``scene.same_scene``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from g4v_jax.t2v.base import T2VError, T2VSettings, register_backend
from g4v_jax.world.scene import BACKGROUND_RGB, MIN_SIZE, parse_caption, render, same_scene


class WorldRenderer:
    """``T2VBackend`` that draws world captions (module docstring)."""

    name = "world"

    def generate(self, prompts: Sequence[str], settings: T2VSettings) -> np.ndarray:
        if isinstance(prompts, str):
            raise TypeError("generate takes a sequence of prompts, not a single str")
        f, h, w = settings.num_frames, settings.height, settings.width
        side = min(h, w)
        if side < MIN_SIZE:
            raise T2VError(f"world backend: {h}x{w} is too small; the world needs at least {MIN_SIZE} pixels a side")
        out = np.empty((len(prompts), f, h, w, 3), np.uint8)
        top, left = (h - side) // 2, (w - side) // 2
        for i, prompt in enumerate(prompts):
            try:
                scene = parse_caption(prompt)
            except ValueError as e:
                raise T2VError(f"world backend cannot render prompt {prompt!r}: {e}") from None
            out[i] = BACKGROUND_RGB[scene.background]
            out[i, :, top:top + side, left:left + side] = render(scene, num_frames=f, size=side, seed=settings.seed)
        return out


def match_request(requested_caption: str, generated_prompt: str) -> bool:
    """True when ``generated_prompt`` parses to the scene of ``requested_caption`` (object order ignored). An
    unparseable generated prompt is simply wrong; an unparseable requested caption is a bug in the test data and
    raises ``ValueError``."""
    wanted = parse_caption(requested_caption)
    try:
        got = parse_caption(generated_prompt)
    except ValueError:
        return False
    return same_scene(wanted, got)


register_backend("world", WorldRenderer)
