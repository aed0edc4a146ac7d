"""``python -m convert.hf_blip2``: the converter is ``g4v_jax.convert.hf_blip2``."""
from convert import forward

forward(__name__)
