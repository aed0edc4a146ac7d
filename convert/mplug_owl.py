"""``python -m convert.mplug_owl``: the converter is ``g4v_jax.convert.mplug_owl``."""
from convert import forward

forward(__name__)
