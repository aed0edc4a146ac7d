"""Checkpoint converters: HF / mPLUG-Owl / BLIP-2 / SD safety checker -> g4v_jax, and g4v_jax -> HF + PEFT.

They live in the package (evaluation loads HF CLIP through ``hf_clip_text``, training copies tokenizers); the top-level
``convert`` package keeps the documented commands, ``python -m convert.hf_llama SRC DST`` and the rest.
"""
