"""``python -m convert.hf_clip_text``: the converter is ``g4v_jax.convert.hf_clip_text``."""
from convert import forward

forward(__name__)
