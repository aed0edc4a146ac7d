"""``python -m convert.common``: the converter is ``g4v_jax.convert.common``."""
from convert import forward

forward(__name__)
