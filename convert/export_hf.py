"""``python -m convert.export_hf``: the converter is ``g4v_jax.convert.export_hf``."""
from convert import forward

forward(__name__)
