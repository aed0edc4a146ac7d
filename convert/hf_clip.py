"""``python -m convert.hf_clip``: the converter is ``g4v_jax.convert.hf_clip``."""
from convert import forward

forward(__name__)
