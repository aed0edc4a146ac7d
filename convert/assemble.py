"""``python -m convert.assemble``: the converter is ``g4v_jax.convert.assemble``."""
from convert import forward

forward(__name__)
