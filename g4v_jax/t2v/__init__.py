"""Text-to-video backends: render the prompts the LLM writes between ``<video>`` tags (paper §3.2).

``make_backend("solid")`` needs no weights (tests, demos); ``make_backend("diffusers", path=...)`` runs any local
diffusers text-to-video pipeline (ZeroScope by default in the paper) with torch, imported only when it is built.
See ``base`` for the interface and ``render_requests``, ``diffusers_backend`` for the torch backend.
"""

from g4v_jax.t2v import base
from g4v_jax.t2v.base import (
    BACKENDS,
    RenderedVideo,
    SolidBackend,
    T2VBackend,
    T2VError,
    T2VSettings,
    check_videos,
    make_backend,
    register_backend,
    render_requests,
    write_gif,
    write_videos,
)
from g4v_jax.t2v.diffusers_backend import DiffusersBackend  # registers "diffusers"; torch is imported lazily

__all__ = [*base.__all__, "DiffusersBackend"]
