"""``python -m convert.gguf``: the converter is ``g4v_jax.convert.gguf``."""
from convert import forward

forward(__name__)
