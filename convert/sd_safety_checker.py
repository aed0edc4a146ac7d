"""``python -m convert.sd_safety_checker``: the converter is ``g4v_jax.convert.sd_safety_checker``."""
from convert import forward

forward(__name__)
