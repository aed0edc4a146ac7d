"""g4v_jax: GPT4Video in pure JAX.

    import g4v_jax
    model = g4v_jax.load("converted/")          # config.yaml + model.safetensors
    tokens = model(frames, frame_mask)           # (B, T, H, W, 3) uint8 -> (B, Nv, D_llm)
"""

from g4v_jax.config import Config, load_config
from g4v_jax.weights import load, save_pretrained

__all__ = ["Config", "load", "load_config", "save_pretrained"]
__version__ = "0.1.0"
