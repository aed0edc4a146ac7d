"""Safety (paper §3.4, §4.3-4.4): the Stable Diffusion NSFW checker GPT4Video runs on videos, and refusals.

    from g4v_jax.safety import flag_video, load_safety_checker
    checker = load_safety_checker("ckpt/safety_checker")   # python -m convert.sd_safety_checker SRC ckpt/safety_checker
    verdict = flag_video(checker, frames)                  # (T, H, W, 3) uint8 -> VideoVerdict(flagged, ...)

The checker's names are imported on first use, so ``g4v_jax.safety.refusal`` stays free of JAX.
"""

_CHECKER_NAMES = (
    "SafetyChecker", "VideoVerdict", "cosine_distance", "flag_video", "load_safety_checker", "safety_scores",
    "save_safety_checker",
)

__all__ = list(_CHECKER_NAMES)


def __getattr__(name):
    if name in _CHECKER_NAMES:
        from g4v_jax.safety import checker

        return getattr(checker, name)
    raise AttributeError(f"module 'g4v_jax.safety' has no attribute {name!r}")
