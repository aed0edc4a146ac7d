"""``python -m convert.hf_llama``: the converter is ``g4v_jax.convert.hf_llama``."""
from convert import forward

forward(__name__)
