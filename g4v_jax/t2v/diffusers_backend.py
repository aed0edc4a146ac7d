"""The ``diffusers`` text-to-video backend: any local diffusers text-to-video pipeline directory (torch).

ZeroScope (``zeroscope_v2_576w``: a ``TextToVideoSDPipeline``, 24 frames of 576x320, 40 steps with
``DPMSolverMultistepScheduler``) is the paper's renderer; Wan, LTX-Video, CogVideoX and AnimateDiff load the same way:

    backend = DiffusersBackend("ckpt/zeroscope_v2_576w", scheduler="dpm")       # or make_backend("diffusers", path=...)
    videos = backend.generate(["a red panda eating bamboo"], T2VSettings())     # uint8 (1, 24, 320, 576, 3)
    wan = make_backend("diffusers", path="ckpt/Wan2.1-T2V-1.3B-Diffusers", prompt_suffix=", cinematic")
    wan.generate(prompts, wan.default_settings)                                 # 81 frames of 480x832, 50 steps

Families
    The pipeline class in ``model_index.json`` picks the family (``t2v.families``): its frame and size rules (read
    from the loaded pipeline), defaults, fps, dtype on CUDA and text length. ``plan(prompts, settings)`` says what
    ``generate`` will send: frames and size moved to the rules (or a ``T2VError`` with ``strict=True``), prompts
    through the ``PromptTemplate`` with any truncation reported; ``render_requests`` keeps that with each video.

Why torch
    diffusers 0.42 has no Flax code at all, and it never had a Flax text-to-video pipeline (its last Flax release,
    0.39, only kept image pipelines, and those could no longer run once transformers dropped ``FlaxCLIPTextModel``).
    So this backend runs the torch pipeline. The LLM is untouched by that choice: ``T2VBackend.generate`` (strings in,
    uint8 frames out) is where a JAX text-to-video model would plug in; there is none here, and none is faked.

Loading
    ``DiffusionPipeline.from_pretrained(path, local_files_only=True)``: nothing is downloaded; the directory must hold
    a ``model_index.json`` (what ``save_pretrained`` or a hub snapshot writes). ``TextToVideoSDPipeline`` lives under
    ``diffusers.pipelines.deprecated`` since 0.33 and logs a deprecation notice when built; it works in 0.42.1.
    The dtype goes in as ``dtype=`` on diffusers >= 0.42 (``torch_dtype=`` is deprecated there), ``torch_dtype=``
    before. ``cpu_offload=True`` uses ``enable_model_cpu_offload`` (needs the ``accelerate`` package).

Output format (pinned: the ``torch`` extra pins diffusers==0.42.1)
    We always ask for ``output_type="np"``; the backend's contract is uint8 (N, F, H, W, 3). What ``.frames`` holds
    changed across releases, so ``_to_uint8_videos`` accepts every layout we know of and checks N:
      - diffusers >= 0.26 (PR #6626, "standardise outputs for video pipelines"): float32 ndarray (N, F, H, W, 3) in
        [0, 1] for ``"np"``; a list of N lists of F PIL images for ``"pil"``; a tensor (N, F, C, H, W) for ``"pt"``;
      - diffusers < 0.26 (``tensor2vid``): a list of F uint8 arrays (H, N*W, 3), the batch laid side by side along
        the width (so one prompt gave a list of (H, W, 3) frames);
      - (F, H, W, 3) for one prompt (what ``.frames[0]`` is today), channels-first frames, grayscale or RGBA frames.
    Floats are mapped to uint8 by rounding ``x * 255`` (NaN or values outside [0, 1] are a ``T2VError``: an fp16
    overflow shows up as NaN). Anything else is a ``T2VError`` naming the layout it got, never a silent reshape.

Seeds
    Each prompt gets its own CPU ``torch.Generator`` seeded with ``settings.seed``, so a prompt's noise (and, up to
    float rounding, its video) does not depend on the other prompts in the batch or on the device.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from g4v_jax.t2v.base import T2VError, T2VSettings, check_videos, register_backend
from g4v_jax.t2v.families import (
    FAMILIES, GENERIC, PromptTemplate, family_for_pipeline, fit_settings, probe, read_rules,
)

logger = logging.getLogger(__name__)

__all__ = ["DiffusersBackend", "Plan"]

_INSTALL_HINT = "install the torch extra: pip install -e '.[torch]' (torch and diffusers, pinned in pyproject.toml)"

# Short names for the schedulers one swaps into a text-to-video pipeline; any diffusers *Scheduler class name works too.
SCHEDULERS = {
    "dpm": "DPMSolverMultistepScheduler",  # ZeroScope's documented choice
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}

_DTYPES = {
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}


def _import_torch_diffusers():
    try:
        import torch
        import diffusers
    except ImportError as e:
        raise ImportError(f"the 'diffusers' text-to-video backend needs torch and diffusers ({e}); {_INSTALL_HINT}"
                          ) from e
    return torch, diffusers


def _resolve_dtype(torch: Any, dtype: Any, device: str):
    if dtype is None:
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower())
    if name is None:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype")
    return getattr(torch, name)


def _dtype_keyword(diffusers: Any) -> str:
    """``dtype`` where diffusers takes it without a deprecation warning (0.42+), else the older ``torch_dtype``."""
    try:
        major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    except ValueError:
        return "torch_dtype"
    return "dtype" if (major, minor) >= (0, 42) else "torch_dtype"


# --------------------------------------------------------------------------------------------------------------------
# Output normalisation
# --------------------------------------------------------------------------------------------------------------------


def _is_pil(x: Any) -> bool:
    return hasattr(x, "getbands") and hasattr(x, "convert")


def _leaf_to_numpy(x: Any) -> Any:
    """torch tensors and PIL images -> numpy; lists/tuples recursively; anything else as is."""
    if isinstance(x, np.ndarray):
        return x
    if _is_pil(x):
        return np.asarray(x.convert("RGB"))
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        t = x.detach().cpu()
        if t.is_floating_point():
            t = t.float()  # bf16/fp16 -> fp32: numpy has no bf16
        return t.numpy()
    if isinstance(x, (list, tuple)):
        return [_leaf_to_numpy(v) for v in x]
    return x


def _channels_last(video: np.ndarray) -> np.ndarray:
    """(F, H, W, C) or (F, C, H, W) with C in {1, 3, 4}, or (F, H, W) -> (F, H, W, 3)."""
    if video.ndim == 3:
        video = video[..., None]
    if video.ndim != 4:
        raise ValueError(f"a video must have 3 or 4 dims (F, H, W[, C]), got shape {video.shape}")
    if video.shape[-1] not in (1, 3, 4) and video.shape[1] in (1, 3, 4):
        video = video.transpose(0, 2, 3, 1)  # channels first ("pt" output)
    if video.shape[-1] not in (1, 3, 4):
        raise ValueError(f"cannot find the channel axis (1, 3 or 4 channels) in a video of shape {video.shape}")
    if video.shape[-1] == 1:
        video = np.repeat(video, 3, axis=-1)
    return video[..., :3]


def _video_to_uint8(video: np.ndarray) -> np.ndarray:
    if video.dtype == np.uint8:
        return video
    if np.issubdtype(video.dtype, np.floating):
        if not np.all(np.isfinite(video)):
            raise ValueError("frames contain NaN or inf (e.g. an fp16 overflow: try dtype='bfloat16' or 'float32')")
        lo, hi = float(video.min()), float(video.max())
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"float frames must lie in [0, 1], got values in [{lo:g}, {hi:g}]")
        return np.round(np.clip(video.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {video.dtype}")


def _stack(frames: list, what: str) -> np.ndarray:
    arrays = [np.asarray(f) for f in frames]
    if not arrays:
        raise ValueError(f"{what} is empty")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{what} has frames of different shapes: {sorted(shapes)}")
    return np.stack(arrays)


def _to_uint8_videos(frames: Any, n_prompts: int) -> np.ndarray:
    """A pipeline's ``.frames``, in any layout diffusers has used (module docstring), -> uint8 (N, F, H, W, 3).

    Raises ``ValueError`` naming the layout when it is not one of them or does not hold ``n_prompts`` videos.
    """
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
    frames = _leaf_to_numpy(frames)
    if isinstance(frames, np.ndarray):
        if frames.ndim == 4 and n_prompts == 1:
            frames = frames[None]  # one video (F, H, W, C)
        if frames.ndim != 5:
            raise ValueError(f"expected an array (N, F, H, W, 3) for {n_prompts} prompt(s), got shape {frames.shape}")
        videos = list(frames)
    elif isinstance(frames, list):
        if not frames:
            raise ValueError("frames is an empty list")
        if all(isinstance(v, list) or (isinstance(v, np.ndarray) and v.ndim == 4) for v in frames):
            # one entry per video: a list of frames (PIL/arrays) or an (F, H, W, C) array
            videos = [_stack(v, f"video {k}") if isinstance(v, list) else v for k, v in enumerate(frames)]
        elif all(isinstance(v, np.ndarray) and v.ndim in (2, 3) for v in frames):
            # one list of frames: a single video, or diffusers < 0.26 with the batch side by side along the width
            stacked = _stack(frames, "frame list")
            if n_prompts > 1:
                if stacked.ndim != 4 or stacked.shape[2] % n_prompts:
                    raise ValueError(f"a flat list of frames of shape {stacked.shape[1:]} cannot hold {n_prompts} "
                                     "videos side by side along the width")
                stacked = np.stack(np.split(stacked, n_prompts, axis=2))  # (N, F, H, W, C)
                videos = list(stacked)
            else:
                videos = [stacked]
        else:
            kinds = sorted({type(v).__name__ + (f"{v.ndim}d" if isinstance(v, np.ndarray) else "") for v in frames})
            raise ValueError(f"unrecognised frames list with entries of type {kinds}")
    else:
        raise ValueError(f"unrecognised frames of type {type(frames).__name__}")

    if len(videos) != n_prompts:
        raise ValueError(f"got {len(videos)} video(s) for {n_prompts} prompt(s)")
    videos = [_video_to_uint8(_channels_last(np.asarray(v))) for v in videos]
    shapes = {v.shape for v in videos}
    if len(shapes) != 1:
        raise ValueError(f"videos of different shapes: {sorted(shapes)}")
    return np.ascontiguousarray(np.stack(videos))


# --------------------------------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``generate`` sends the pipeline for some prompts: the adapted prompts, the fitted settings and, per
    prompt, the notes a user should see (frames or size moved to the family's rule, a prompt truncated)."""

    prompts: tuple[str, ...]
    settings: T2VSettings
    notes: tuple[tuple[str, ...], ...]


def _read_class_name(path: Path) -> str:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise T2VError(f"{str(path)!r}: cannot read model_index.json: {type(e).__name__}: {e}") from e
    name = index.get("_class_name") if isinstance(index, dict) else None
    if not isinstance(name, str):
        raise T2VError(f"{str(path)!r}: model_index.json has no '_class_name' naming the pipeline class")
    return name


class DiffusersBackend:
    """A local diffusers text-to-video pipeline directory as a ``T2VBackend`` (module docstring).

    Args:
        path: the pipeline directory (with ``model_index.json``).
        family: a ``t2v.families.FAMILIES`` name; None reads it from the directory's pipeline class (an unknown class
            is ``"generic"``: no rule applied, diffusers' own checks speak).
        device: ``"cuda"`` if torch sees a GPU, else ``"cpu"``.
        dtype: the family's on CUDA (float16 for ZeroScope and AnimateDiff, bfloat16 for Wan, LTX-Video, CogVideoX),
            float32 on CPU; ``"bfloat16"`` / ``"float16"`` / ``"float32"`` (or a ``torch.dtype``). Wan's VAE stays
            float32 (its documented setting).
        cpu_offload: ``True`` / ``"model"``: each component moves to ``device`` when it runs
            (``enable_model_cpu_offload``); ``"sequential"``: layer by layer (least memory, slowest). Needs
            ``accelerate``.
        vae_tiling, vae_slicing: decode in tiles / one video at a time (the VAE's ``enable_tiling`` /
            ``enable_slicing``): less memory for large or many videos.
        scheduler: ``None`` keeps the directory's scheduler; ``"dpm"`` (ZeroScope's), ``"ddim"``, ``"euler"``,
            ``"unipc"`` or a diffusers scheduler class name rebuilds it ``from_config`` of the saved one.
        prompt_prefix, prompt_suffix, max_prompt_tokens: the ``PromptTemplate`` (module docstring of ``families``).
        strict: a request that breaks the family's frame or size rule is an error instead of being rounded.
        progress: show diffusers' per-step progress bar.

    ``default_settings`` and ``fps`` are the family's; ``rules`` the loaded pipeline's.
    """

    name = "diffusers"

    def __init__(self, path: str | os.PathLike, *, family: str | None = None, device: str | None = None,
                 dtype: Any = None, cpu_offload: bool | str = False, vae_tiling: bool = False,
                 vae_slicing: bool = False, scheduler: str | None = None, prompt_prefix: str = "",
                 prompt_suffix: str = "", max_prompt_tokens: int | None = None, strict: bool = False,
                 progress: bool = False) -> None:
        torch, diffusers = _import_torch_diffusers()
        self._torch = torch
        self.path = Path(path)
        if not self.path.exists():
            raise T2VError(f"{str(self.path)!r}: no such text-to-video pipeline directory")
        if not (self.path / "model_index.json").is_file():
            raise T2VError(f"{str(self.path)!r}: not a diffusers pipeline directory (no model_index.json); pass the "
                           "folder that save_pretrained wrote or a hub snapshot of the pipeline")
        if family is None:
            self.family = family_for_pipeline(_read_class_name(self.path))
        elif family in FAMILIES or family == GENERIC.name:
            self.family = FAMILIES.get(family, GENERIC)
        else:
            raise ValueError(f"unknown text-to-video family {family!r}; known: {', '.join([*FAMILIES, GENERIC.name])}")
        if cpu_offload not in (False, True, "model", "sequential"):
            raise ValueError(f"cpu_offload must be False, True, 'model' or 'sequential', got {cpu_offload!r}")
        self.template = PromptTemplate(prompt_prefix, prompt_suffix, max_prompt_tokens)
        self.strict = strict
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_cuda = str(self.device).startswith("cuda")
        if cpu_offload and not on_cuda:  # offload moves components onto the GPU as they run; sequential fails on CPU
            raise ValueError(f"cpu_offload={cpu_offload!r} needs a CUDA device; the pipeline runs on {self.device!r}, "
                             "where everything is in host memory already: leave cpu_offload off")
        self.dtype = _resolve_dtype(torch, dtype if dtype is not None or not on_cuda else self.family.cuda_dtype,
                                    self.device)
        dtypes = {"default": self.dtype, **{c: torch.float32 for c in self.family.keep_fp32}}
        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(
                os.fspath(self.path), local_files_only=True,
                **{_dtype_keyword(diffusers): dtypes if len(dtypes) > 1 else self.dtype})
        except Exception as e:  # noqa: BLE001 - OSError, ValueError, safetensors errors, ...
            raise T2VError(f"{str(self.path)!r}: cannot load the diffusers pipeline: {type(e).__name__}: {e}") from e
        if scheduler is not None:
            pipe.scheduler = self._make_scheduler(diffusers, scheduler, pipe)
        for switch, wanted in (("enable_tiling", vae_tiling), ("enable_slicing", vae_slicing)):
            if wanted:
                if not hasattr(getattr(pipe, "vae", None), switch):
                    raise T2VError(f"{str(self.path)!r}: the pipeline's VAE has no {switch}()")
                getattr(pipe.vae, switch)()
        try:
            if cpu_offload == "sequential":
                pipe.enable_sequential_cpu_offload(device=self.device)
            elif cpu_offload:
                pipe.enable_model_cpu_offload(device=self.device)
            else:
                pipe.to(self.device)
        except Exception as e:  # noqa: BLE001 - missing accelerate, no such device, OOM while moving weights
            how = "enabling CPU offload to" if cpu_offload else "moving the pipeline to"
            raise T2VError(f"{str(self.path)!r}: {how} {self.device!r} failed: {type(e).__name__}: {e}") from e
        pipe.set_progress_bar_config(disable=not progress)
        self.pipeline = pipe
        self.rules = read_rules(self.family, pipe)
        self.default_settings = self.family.settings
        self.fps = self.family.fps
        params = inspect.signature(pipe.__call__).parameters
        self._call_params = None if any(p.kind is p.VAR_KEYWORD for p in params.values()) else set(params)
        self._warned: set[str] = set()
        self.text_length = self._text_length()
        self.prompt_budget = self.template.max_tokens or self.text_length
        fixed = self._count_tokens(self.template.apply(""))
        if self.prompt_budget is not None and fixed >= self.prompt_budget:
            raise ValueError(f"the prompt template's prefix and suffix alone take {fixed} of the {self.prompt_budget} "
                             f"tokens {type(pipe).__name__} reads")

    def _make_scheduler(self, diffusers: Any, scheduler: str, pipe: Any) -> Any:
        cls_name = SCHEDULERS.get(scheduler.lower(), scheduler)
        cls = getattr(diffusers, cls_name, None) if cls_name.endswith("Scheduler") else None
        if cls is None:
            raise ValueError(f"unknown scheduler {scheduler!r}; use one of {sorted(SCHEDULERS)} or a diffusers "
                             "scheduler class name")
        if getattr(pipe, "scheduler", None) is None:
            raise T2VError(f"{str(self.path)!r}: the pipeline has no scheduler to replace")
        return cls.from_config(pipe.scheduler.config)

    def __repr__(self) -> str:
        return (f"DiffusersBackend({str(self.path)!r}, family={self.family.name}, "
                f"pipeline={type(self.pipeline).__name__}, device={self.device!r}, dtype={self.dtype}, "
                f"scheduler={type(self.pipeline.scheduler).__name__})")

    # ---- prompts ---------------------------------------------------------------------------------------------------

    def _text_length(self) -> int | None:
        """Tokens the model reads: the family's ``max_sequence_length`` (T5) or the tokenizer's own (CLIP)."""
        length = self.family.text_length
        if isinstance(length, str):
            length = probe(self.pipeline, length)
        if length is None:
            length = getattr(getattr(self.pipeline, "tokenizer", None), "model_max_length", None)
            if not isinstance(length, int) or length > 100_000:  # transformers' "no limit" sentinel
                length = None
        return length

    def _count_tokens(self, text: str) -> int:
        tokenizer = getattr(self.pipeline, "tokenizer", None)
        if tokenizer is None:
            return 0
        return len(tokenizer(text, truncation=False, verbose=False).input_ids)

    def adapt_prompt(self, caption: str) -> tuple[str, tuple[str, ...]]:
        """``caption`` through the template, whole words dropped from its end until it fits the token budget; the
        prompt to send and the notes (a truncation is reported, never silent)."""
        text = self.template.apply(caption)
        budget = self.prompt_budget
        if budget is None or self._count_tokens(text) <= budget:
            return text, ()
        words = caption.split()
        lo, hi = 0, len(words)  # the longest prefix of words that fits: binary search on the count
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._count_tokens(self.template.apply(" ".join(words[:mid]))) <= budget:
                lo = mid
            else:
                hi = mid - 1
        kept = self.template.apply(" ".join(words[:lo]))
        dropped = " ".join(words[lo:])
        return kept, (f"prompt truncated to {budget} tokens of {type(self.pipeline).__name__}'s tokenizer: dropped "
                      f"{len(words) - lo} word(s) {dropped[:80]!r}",)

    def plan(self, prompts: Sequence[str], settings: T2VSettings) -> Plan:
        """What ``generate`` would send for ``prompts`` (raises ``T2VError`` when ``strict`` and a rule is broken)."""
        if isinstance(prompts, str):
            raise TypeError("plan takes a sequence of prompts, not a single str")
        try:
            fitted, setting_notes = fit_settings(settings, self.rules, strict=self.strict)
        except ValueError as e:
            raise T2VError(f"{str(self.path)!r}: {e}") from None
        adapted = [self.adapt_prompt(p) for p in prompts]
        return Plan(tuple(a[0] for a in adapted), fitted, tuple(setting_notes + a[1] for a in adapted))

    # ---- generation ------------------------------------------------------------------------------------------------

    def _supported(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Drop keyword arguments this pipeline's ``__call__`` does not take (warning once per name)."""
        if self._call_params is None:
            return kwargs
        for key in ("prompt", "output_type"):
            if key not in self._call_params:
                raise T2VError(f"{str(self.path)!r}: {type(self.pipeline).__name__} takes no {key!r} argument; "
                               "is it a text-to-video pipeline?")
        kept = {}
        for key, value in kwargs.items():
            if key in self._call_params:
                kept[key] = value
            elif key not in self._warned:
                self._warned.add(key)
                warnings.warn(f"{type(self.pipeline).__name__} does not take {key!r}; that setting is ignored",
                              stacklevel=3)
        return kept

    def _note(self, notes: Sequence[str]) -> None:
        for note in notes:
            if note not in self._warned:
                self._warned.add(note)
                logger.warning("%s: %s", self.path, note)

    def call_arguments(self, plan: Plan) -> dict[str, Any]:
        """The keyword arguments of the pipeline call for ``plan`` (what ``generate`` passes; ``bench/t2v.py`` calls
        the pipeline with them directly as the peer)."""
        torch, s = self._torch, plan.settings
        kwargs: dict[str, Any] = dict(
            prompt=list(plan.prompts),
            num_frames=s.num_frames,
            height=s.height,
            width=s.width,
            num_inference_steps=s.steps,
            guidance_scale=float(s.guidance_scale),
            generator=[torch.Generator(device="cpu").manual_seed(s.seed) for _ in plan.prompts],
            output_type="np",
        )
        if s.negative_prompt is not None:
            kwargs["negative_prompt"] = [s.negative_prompt] * len(plan.prompts)
        if self.family.text_length is not None and self.text_length is not None:
            kwargs["max_sequence_length"] = self.text_length
        if self.family.fps_argument:
            kwargs[self.family.fps_argument] = self.fps
        return self._supported(kwargs)

    def generate(self, prompts: Sequence[str], settings: T2VSettings) -> np.ndarray:
        if isinstance(prompts, str):
            raise TypeError("generate takes a sequence of prompts, not a single str")
        return self.run(self.plan(prompts, settings))

    def run(self, plan: Plan) -> np.ndarray:
        """The videos of a ``plan`` (``generate`` is ``run(plan(...))``; ``render_requests`` keeps the plan's notes)."""
        n, s = len(plan.prompts), plan.settings
        if n == 0:
            return np.zeros((0, s.num_frames, s.height, s.width, 3), np.uint8)
        self._note(sorted({note for notes in plan.notes for note in notes}))
        torch = self._torch
        what = (f"{n} video(s) of {s.num_frames}x{s.height}x{s.width}, {s.steps} steps, on {self.device} "
                f"({self.dtype})")
        try:
            out = self.pipeline(**self.call_arguments(plan))
        except Exception as e:  # noqa: BLE001 - torch OOM is a RuntimeError; shape/argument errors ValueError
            message = f"{type(e).__name__}: {e}"
            if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # let the next, smaller, request run
                message += ("; try cpu_offload=True, vae_tiling=True, a smaller batch_size, fewer frames or a smaller "
                            "size")
            raise T2VError(f"{str(self.path)!r}: generating {what} failed: {message}") from e
        frames = out.frames if hasattr(out, "frames") else out[0]
        try:
            videos = _to_uint8_videos(frames, n)
        except ValueError as e:
            raise T2VError(f"{str(self.path)!r}: unexpected {type(self.pipeline).__name__} output: {e}") from e
        if self.family is not GENERIC and videos.shape[1:4] != (s.num_frames, s.height, s.width):
            raise T2VError(f"{str(self.path)!r}: {type(self.pipeline).__name__} returned videos of "
                           f"{videos.shape[1:4]} (frames, height, width) for a request of {s.num_frames}x{s.height}x"
                           f"{s.width}; its rules differ from the {self.family.name!r} family's "
                           f"({self.rules.describe()})")
        return check_videos(videos, n)


register_backend("diffusers", DiffusersBackend, replace=True)  # replace: importlib.reload stays possible
