"""Configuration as data: frozen dataclasses loaded from YAML, with ``key=value`` overrides.

(~590 lines: every section's dataclass and the one loader that validates them all; one place for every key.)

A config file (``configs/*.yaml``) has up to three sections, ``model``, ``mesh`` and ``train``. A section is either a
mapping or a string naming another YAML file (relative to the including file, then to ``configs/``), so one mesh file
serves every model. Any mapping may also carry ``base: other.yaml`` to start from another file and change a few keys.

Overrides address nested fields with dots: ``model.vision.num_layers=2``, ``mesh.fsdp=8``, or swap a whole section
for a file: ``train=train/stage2.yaml``. Values are parsed as YAML (``true``, ``1e-4``, ``[1, 2]``). An unknown key anywhere is an error that names the key and the keys that exist.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# ----------------------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT (HF ``CLIPVisionModel``) or mPLUG-Owl's video variant of it."""

    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5  # HF CLIP 1e-5; mPLUG-Owl 1e-6
    # mPLUG-Owl-video: residual local temporal adapter on patch tokens in every layer (only when T > 1).
    temporal_adapter: bool = False
    temporal_adapter_eps: float = 1e-5  # its LayerNorm is built with torch's default eps
    # mPLUG-Owl applies post_layernorm to every token before the abstractor; HF CLIP only to the pooled CLS.
    post_layernorm_all_tokens: bool = False

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1


ABSTRACTOR_VARIANTS = ("mplug_owl_video", "paper", "qformer", "st_pool")


@dataclasses.dataclass(frozen=True)
class AbstractorConfig:
    """The module between the vision tower and the LLM (the paper's Table 5 compares them):

    * ``mplug_owl_video``: the released checkpoint's abstractor; ``paper``: eqs. 1-3 (``models/abstractor.py``);
      either without the temporal (enhance) stream when ``num_temporal_tokens`` is 0 (Table 5 #1);
    * ``qformer``: BLIP-2's Q-Former, ``num_query_tokens`` queries over all T x (1 + N) tokens (#2, #3);
    * ``st_pool``: Video-ChatGPT's spatio-temporal pooling and one linear map (#4).
    """

    variant: str = "mplug_owl_video"
    hidden_size: int = 1024
    num_layers: int = 6
    num_heads: int = 16
    intermediate_size: int = 2816
    num_query_tokens: int = 64  # Ns
    num_temporal_tokens: int = 64  # Nt (the paper's enhance tokens; mPLUG-Owl's temporal query tokens); 0 = none
    norm_eps: float = 1e-5  # norm1 / normk / norm2 (torch default in mPLUG-Owl); every LayerNorm of the qformer
    ffn_norm_eps: float = 1e-6  # ffn_ln
    # paper variant only: whether the Qs and Qt streams run through the same 6 layers (see abstractor.py).
    share_stream_weights: bool = True
    # learned per-frame embeddings added to the video features (0 = none). Eqs. 1-3 are blind to frame order; the
    # released model gets order from the vision tower's temporal adapter, a plain CLIP tower needs these instead.
    frame_embeddings: int = 0
    # qformer only: a layer cross-attends to the video when its index is a multiple of this (BLIP-2: 2)
    cross_attention_frequency: int = 2
    # st_pool only: temporal token slots, one per frame, zeros past the video's frames (Video-ChatGPT: 100);
    # 0 means model.num_frames
    pool_frames: int = 0

    def __post_init__(self):
        if self.variant not in ABSTRACTOR_VARIANTS:
            raise ConfigError(f"abstractor.variant must be one of {', '.join(ABSTRACTOR_VARIANTS)}, got "
                              f"{self.variant!r}")
        if self.variant == "paper" and self.num_temporal_tokens not in (0, self.num_query_tokens):
            raise ConfigError("the paper variant sums Fs + Ft: num_temporal_tokens must equal num_query_tokens "
                              f"({self.num_query_tokens}) or be 0 (no temporal stream), got {self.num_temporal_tokens}")
        if self.num_query_tokens < 1 or self.num_temporal_tokens < 0:
            raise ConfigError("abstractor.num_query_tokens must be >= 1 and num_temporal_tokens >= 0")
        if self.cross_attention_frequency < 1 or self.pool_frames < 0:
            raise ConfigError("abstractor.cross_attention_frequency must be >= 1 and pool_frames >= 0")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """HF ``rope_scaling`` / ``rope_parameters``: ``default``, ``linear`` (LLaMA-2 long context) or ``llama3``."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ConfigError(f"rope_scaling.rope_type {self.rope_type!r} is not supported (default, linear, llama3)")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """HF ``LlamaConfig`` fields we use; defaults are LLaMA-7B (v1), the paper's LLM."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32  # < num_heads: grouped-query attention
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None  # LLaMA has none; batches pad with any id under the attention mask

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"llm.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                              f"({self.num_kv_heads})")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


# the LLaMA projections LoRA may adapt, in a layer's order
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the LLM (paper §3.3); the GPT4Video release: q_proj and v_proj, r=16, alpha=16, dropout 0.1."""

    enabled: bool = True
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.1
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    param_dtype: str = "float32"  # adapters stay fp32 while the frozen base may be bf16
    # adapters off at every token up to the end of the last video span (its close tag; in stage 2 the caption in
    # tags that stands in for the video), in training and inference alike: stage 2 then never changes how the
    # prefix, a video included, is read, so its hidden states stay those that stage 1 aligned the abstractor to
    skip_video_span: bool = False

    def __post_init__(self):
        unknown = set(self.targets) - set(LORA_TARGETS)
        if unknown:
            raise ConfigError(f"lora.targets {sorted(unknown)} unknown; choose from {list(LORA_TARGETS)}")
        if self.rank < 1:
            raise ConfigError("lora.rank must be >= 1")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    """How a video becomes the tower's frames (``g4v_jax.data.video``); part of the model, since a checkpoint was
    trained on frames picked and resized one way: ``convert.mplug_owl`` sets mPLUG-Owl-video's (``mplug_owl``,
    ``squash``), ``convert.hf_clip`` CLIP's (``uniform_mid``, ``short_side_crop``)."""

    sampling: str = "uniform_mid"  # uniform_mid | mplug_owl (its get_index)
    resize: str = "short_side_crop"  # short_side_crop (CLIP) | squash (decord's height/width=224)

    def __post_init__(self):
        if self.sampling not in ("uniform_mid", "mplug_owl"):
            raise ConfigError(f"video.sampling must be uniform_mid or mplug_owl, got {self.sampling!r}")
        if self.resize not in ("short_side_crop", "squash"):
            raise ConfigError(f"video.resize must be short_side_crop or squash, got {self.resize!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``kind`` says which parts a model directory holds: the whole GPT4Video, only the video encoder (vision tower +
    abstractor, e.g. converted from CLIP) or only the language model (converted from HF LLaMA)."""

    kind: str = "gpt4video"  # gpt4video | video_encoder | llm
    vision: VisionConfig = VisionConfig()
    abstractor: AbstractorConfig = AbstractorConfig()
    llm: LlamaConfig = LlamaConfig()
    lora: LoraConfig = LoraConfig()
    llm_hidden_size: int = 4096  # width of the LLM's word embeddings the video tokens are projected to
    num_frames: int = 4  # T
    video: VideoConfig = VideoConfig()  # frame sampling and resizing the checkpoint was trained with
    param_dtype: str = "float32"
    compute_dtype: str = "float32"  # bfloat16 on GPU
    # jax.nn.dot_product_attention implementation: "xla", "cudnn", or "auto" (cudnn on GPU when the shapes allow).
    attention_impl: str = "auto"
    # rematerialisation of each transformer layer in training: none | full (save nothing) | dots (save matmul
    # outputs without batch dims, jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    remat: str = "none"
    # run the LLM's layers with jax.lax.scan over layer-stacked weights: compile time and program size independent
    # of depth (MaxText's scan_layers). Checkpoints and converters name the weights per layer either way.
    scan_layers: bool = False

    def __post_init__(self):
        if self.kind not in ("gpt4video", "video_encoder", "llm"):
            raise ConfigError(f"model.kind must be gpt4video, video_encoder or llm, got {self.kind!r}")
        if self.abstractor.variant == "st_pool" and self.pool_frames < self.num_frames:
            raise ConfigError(f"model.abstractor.pool_frames ({self.abstractor.pool_frames}) must hold "
                              f"model.num_frames ({self.num_frames}): st_pool gives every frame its own temporal token")
        if self.kind == "gpt4video" and self.llm_hidden_size != self.llm.hidden_size:
            raise ConfigError(f"model.llm_hidden_size ({self.llm_hidden_size}) must equal model.llm.hidden_size "
                              f"({self.llm.hidden_size}): video tokens are spliced into the LLM's embeddings")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"model.{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")
        if self.remat not in ("none", "full", "dots"):
            raise ConfigError(f"model.remat must be none, full or dots, got {self.remat!r}")
        if self.attention_impl not in ("xla", "cudnn", "auto"):
            raise ConfigError(f"model.attention_impl must be xla, cudnn or auto, got {self.attention_impl!r}")

    @property
    def num_video_tokens(self) -> int:
        """Tokens one video occupies in the LLM sequence."""
        a = self.abstractor
        if a.variant == "mplug_owl_video":
            return a.num_query_tokens + 1  # + vit_eos
        if a.variant == "st_pool":
            return self.pool_frames + self.vision.num_patches  # temporal tokens, then spatial ones
        return a.num_query_tokens

    @property
    def pool_frames(self) -> int:
        """st_pool's temporal token slots."""
        return self.abstractor.pool_frames or self.num_frames


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes. -1 on one axis means "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # logical axis -> mesh axes, over sharding.DEFAULT_RULES (e.g. {embed: [], mlp: [fsdp]})
    rules: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            size = getattr(self, name)
            if size != -1 and size < 1:
                raise ConfigError(f"mesh.{name} must be >= 1 (or -1 for all remaining devices), got {size}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run (paper §4, §5.1): which stage, the optimizer, the schedule and the bookkeeping."""

    stage: str = "stage1"  # stage1: abstractor | stage2: LoRA adapters, text only | full: the LLM's own weights
    # stage 1 also trains the vision tower. The paper keeps its pretrained CLIP frozen; a model trained from scratch
    # (the synthetic world, g4v_jax.world) has no pretrained tower to keep.
    train_vision_tower: bool = False
    init_from: str = ""  # a g4v_jax model directory to start from ("" = random init from model config)
    tokenizer: str = ""  # tokenizer directory ("" = init_from)
    output_dir: str = "outputs/train"
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.03
    min_learning_rate_ratio: float = 0.0  # cosine decays to learning_rate * this
    weight_decay: float = 0.0  # never applied to norms, biases, embeddings and learned tokens
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip_norm: float = 1.0  # 0 = off
    epochs: int = 2
    max_steps: int = 0  # > 0 caps the run (tests, smoke runs)
    global_batch_size: int = 8  # sequences per optimizer step, over all hosts and micro-batches
    grad_accum_steps: int = 1
    seed: int = 0
    log_every: int = 1
    save_every: int = 100  # checkpoint interval in steps (and at the end)
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    tensorboard: bool = True
    plot: bool = True  # loss-curve PNG at the end
    # Divergence without NaNs stops the run like a NaN does (the offending update is not applied, the last good
    # checkpoint is kept): a loss above loss_spike_factor x its mean over the last loss_spike_window steps (and at
    # least 1 nat above it), or an update larger than max_update_ratio x the trainable weights' norm (an Adam step
    # of a learning rate far too high). 0 turns a check off.
    loss_spike_factor: float = 3.0
    loss_spike_window: int = 20
    max_update_ratio: float = 1.0
    # stage 2 on a pretrained LLM: the tokens of manifest examples marked "distill" train toward the untuned LLM's
    # own predictions (KL, the adapters off) with this weight, in place of their text; 0: they train on their text
    distill_weight: float = 0.0

    def __post_init__(self):
        if self.stage not in ("stage1", "stage2", "full"):
            raise ConfigError(f"train.stage must be stage1, stage2 or full, got {self.stage!r}")
        if self.distill_weight and self.stage != "stage2":
            raise ConfigError(f"train.distill_weight distils toward the LLM with its LoRA adapters off, so it needs "
                              f"train.stage=stage2, not {self.stage!r}")
        at_least = {"global_batch_size": 1, "grad_accum_steps": 1, "epochs": 1, "log_every": 1, "save_every": 1,
                    "keep_checkpoints": 1, "max_steps": 0, "loss_spike_window": 2}
        for name, low in at_least.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"train.{name} must be an integer >= {low}, got {value!r}")
        positive = ("learning_rate", "adam_eps")
        non_negative = ("weight_decay", "grad_clip_norm", "loss_spike_factor", "max_update_ratio", "distill_weight")
        for name in positive + non_negative:
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name in positive and value == 0):
                raise ConfigError(f"train.{name} must be a finite number {'> 0' if name in positive else '>= 0'}, "
                                  f"got {value!r}")
        for name in ("warmup_ratio", "min_learning_rate_ratio", "adam_b1", "adam_b2"):
            value = getattr(self, name)
            if not 0 <= value <= 1 or (name.startswith("adam") and value == 1):
                raise ConfigError(f"train.{name} must lie in [0, 1{')' if name.startswith('adam') else ']'}, "
                                  f"got {value!r}")
        if 0 < self.loss_spike_factor <= 1:
            raise ConfigError(f"train.loss_spike_factor must be > 1 (or 0: off), got {self.loss_spike_factor!r}")
        if self.global_batch_size % self.grad_accum_steps:
            raise ConfigError(f"train.global_batch_size ({self.global_batch_size}) must be divisible by "
                              f"train.grad_accum_steps ({self.grad_accum_steps})")


def derived(default: Any, source: str) -> Any:
    """A field a run's YAML does not set: ``source`` fills it (``data.pipeline_config``), and it is not saved."""
    return dataclasses.field(default=default, metadata={"derived_from": source})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The training data pipeline (``g4v_jax.data.pipeline``): the run's ``data:`` section, and the inputs the
    pipeline takes from the model and the stage (``derived`` fields, filled by ``pipeline.pipeline_config``)."""

    train_manifest: str = ""
    seq_len: int = 512
    max_videos_per_example: int = 1  # V: videos per row in a batch (rows with fewer are padded)
    system_prompt: str | None = None  # None: the GPT4Video release's system prompt; "": none
    worker_count: int = 0  # grain worker processes (0: decode in threads of the main process)
    shuffle: bool = True
    on_bad_video: str = "skip"  # skip (counted, logged) | error
    on_too_long: str = "skip"  # skip | error: longer than seq_len, or more than max_videos_per_example videos
    vision_cache: str = ""  # stage 1: directory of precomputed vision features (g4v_jax.data.feature_cache)
    pack_sequences: bool = False  # text stages: several examples per row, attention kept within each
    # stage 2 reads an example's real videos instead of replacing them by their captions (the paper's stage 2 is
    # text-only: this departs from it); examples without videos are unchanged
    stage2_keep_videos: bool = False

    num_frames: int = derived(4, "model.num_frames")
    image_size: int = derived(224, "model.vision.image_size")
    video_sampling: str = derived("uniform_mid", "model.video.sampling")
    video_resize: str = derived("short_side_crop", "model.video.resize")
    num_video_tokens: int = derived(65, "model.num_video_tokens")
    # False (stage 2): videos replaced by their captions, no decoding at all
    use_videos: bool = derived(True, "train.stage and data.stage2_keep_videos")
    seed: int = derived(0, "train.seed")
    # the LoRA adapters skip each example's video span: batches carry "adapter_mask"
    adapter_mask: bool = derived(False, "model.lora.skip_video_span")
    # batches carry "distill": the tokens of examples marked "distill" in the manifest
    distill: bool = derived(False, "train.distill_weight > 0")
    # stage 1 from a vision cache: batches carry "video_features" (B, V, T, 1 + N, Dv) of this shape and dtype
    feature_shape: tuple[int, ...] = derived((), "the vision cache's meta.json")
    feature_dtype: str = derived("float32", "the vision cache's meta.json")

    def __post_init__(self):
        for name in ("on_bad_video", "on_too_long"):
            if getattr(self, name) not in ("skip", "error"):
                raise ConfigError(f"data.{name} must be skip or error, got {getattr(self, name)!r}")
        for name, low in (("seq_len", 2), ("max_videos_per_example", 1), ("worker_count", 0), ("num_frames", 1),
                          ("image_size", 1), ("num_video_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"data.{name} must be an integer >= {low}, got {value!r}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ConfigError(f"data.system_prompt must be a string or null, got {self.system_prompt!r}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The continuous-batching inference engine (``g4v_jax.inference.engine``): its decode slots and KV cache.

    The cache is preallocated (every layer's keys and values for num_slots x max_length positions) in the compute
    dtype; a request fits when its prompt plus its token budget fit ``max_length`` (and the model's context)."""

    num_slots: int = 8  # requests decoded together by one step program
    max_length: int = 2048  # cache positions per slot: prompt + generated tokens
    min_bucket: int = 32  # prompts are padded to a power of two >= this (one prefill program per bucket)
    max_videos: int = 4  # videos per request (the prefill program's video input is sized for this many)
    max_queue: int = 1024  # waiting requests beyond the slots; more are refused (the server answers 429/503)
    # a finished request's KV stays in its slot; a new request starting with the same tokens (videos by content)
    # continues from there (free slots are evicted least recently used first)
    prefix_cache: bool = True
    prefill_chunk: int = 512  # prompt tokens prefilled between two decode steps (bounds the inter-token latency)
    video_cache_mb: float = 64.0  # encoded video tokens kept by the frames' content hash (LRU)

    def __post_init__(self):
        for name, low in (("num_slots", 1), ("max_length", 2), ("min_bucket", 1), ("max_videos", 1),
                          ("max_queue", 0), ("prefill_chunk", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"engine.{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.prefix_cache, bool):
            raise ConfigError(f"engine.prefix_cache must be true or false, got {self.prefix_cache!r}")
        if isinstance(self.video_cache_mb, bool) or not isinstance(self.video_cache_mb, (int, float)) or \
                not self.video_cache_mb >= 0:
            raise ConfigError(f"engine.video_cache_mb must be a number >= 0, got {self.video_cache_mb!r}")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    engine: EngineConfig = EngineConfig()


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key_error(where: str, key: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {where + key!r}.{hint} Known keys here: {', '.join(sorted(known))}")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where.rstrip('.')} must be a mapping, got {value!r}")
        return from_dict(typ, value, f"{where}.")
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(typ)[:1] or (Any,)
        return tuple(_coerce(v, item, where) for v in value)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if typ is float:
        try:
            return float(value)  # YAML reads 1e-4 (no dot) as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: Mapping[str, Any], where: str = ""):
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    types_ = _field_types(cls)
    sources = {f.name: f.metadata["derived_from"] for f in dataclasses.fields(cls) if "derived_from" in f.metadata}
    kwargs = {}
    for key, value in data.items():
        if key in sources:
            raise ConfigError(f"config key {where + key!r} is not set in a config: it comes from {sources[key]}")
        if key not in types_:
            raise _unknown_key_error(where, key, [k for k in types_ if k not in sources])
        kwargs[key] = _coerce(value, types_[key], f"{where}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: {e}") from e


def to_dict(cfg) -> dict[str, Any]:
    """A plain, YAML-serialisable dict of a config (tuples become lists; ``derived`` fields left out)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)
                    if "derived_from" not in f.metadata}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _resolve(ref: str, including_dir: Path) -> Path:
    for base in (including_dir, CONFIGS_DIR):
        for candidate in (base / ref, base / f"{ref}.yaml"):
            if candidate.is_file():
                return candidate
    raise ConfigError(f"config file {ref!r} not found (looked in {including_dir} and {CONFIGS_DIR})")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _expand(data: Any, directory: Path, depth: int = 0) -> Any:
    """Replace string sections by the files they name and apply ``base:`` inheritance, recursively."""
    if depth > 16:
        raise ConfigError("config includes nest deeper than 16 levels (a cycle?)")
    if isinstance(data, str) and data.endswith((".yaml", ".yml")):
        path = _resolve(data, directory)
        return _expand(_read_yaml(path), path.parent, depth + 1)
    if not isinstance(data, dict):
        return data
    out: dict[str, Any] = {}
    if "base" in data:
        path = _resolve(data["base"], directory)
        out = _expand(_read_yaml(path), path.parent, depth + 1)
    for key, value in data.items():
        if key == "base":
            continue
        value = _expand(value, directory, depth + 1)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merge(out[key], value)
        out[key] = value
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["model.vision.num_layers=2"]`` -> ``{"model": {"vision": {"num_layers": 2}}}``."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def load_config(source: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = (), cls=Config):
    """Load a config and apply ``key=value`` overrides.

    ``source`` is a file path, a name under ``configs/`` (``"tiny"`` -> ``configs/tiny.yaml``), a mapping in the
    file format (``{"model": "model/tiny.yaml"}``), or None for the defaults.
    """
    data: dict[str, Any] = {}
    if isinstance(source, Mapping):
        data = _expand(dict(source), CONFIGS_DIR)
    elif source is not None:
        p = Path(source)
        if not p.is_file():
            p = _resolve(str(source), Path.cwd())
        data = _expand(_read_yaml(p), p.parent)
    # applied in order; an override may name a section file too: train=train/stage2.yaml train.epochs=1
    for item in overrides:
        data = _merge(data, _expand(parse_overrides([item]), CONFIGS_DIR))
    return from_dict(cls, data)


def dump_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
