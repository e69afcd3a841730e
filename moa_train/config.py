"""Config schemas (one dataclass per Hydra group) and the value checks Hydra cannot express.

The YAML files under conf/ are merged onto `RunConfig`, so an unknown key or a value of the
wrong type in any group is refused by OmegaConf while Hydra composes the config. Range and
choice checks live in `validate_config`, which runs before any data is read or model built.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import ConfigError, check_choice, check_fraction, check_positive
from .ffn.registry import unused_keys
from .utils import flatten, under


@dataclass
class MoEConfig:
    n_experts: int = 32  # routed experts
    top_k: int = 4
    n_shared_experts: int = 1  # always active, together one FFN n_shared times as wide as an expert
    expert_hidden: int = 512  # hidden width of a Type-II expert; Type-I experts get 3/2 of it (same parameters)
    score: str = "sigmoid"  # router scores: softmax | sigmoid (computed in float32)
    renormalize: bool = True  # top-k weights divided by their sum
    route_scale: float = 1.0
    bias_update_coef: float = 1e-3  # auxiliary-loss-free balancing step; 0 disables
    aux_loss_coef: float = 0.0  # auxiliary balance loss; 0 disables
    grouped_mm: str = "auto"  # auto: torch._grouped_mm where supported, else a loop over experts | torch | loop


@dataclass
class VisionConfig:
    """model.family=mae (moa_train/mae.py): the encoder is model.dim / n_layers / n_heads."""

    image_size: int = 224  # square images of this many pixels a side
    patch_size: int = 16  # must divide image_size
    channels: int = 3
    mask_ratio: float = 0.75  # the share of each image's patches the encoder does not see
    decoder_dim: int = 512
    decoder_layers: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # targets: each patch's pixels normalised to zero mean, unit variance


@dataclass
class ModelConfig:
    name: str = MISSING
    family: str = "dense"
    dim: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    n_kv_heads: int | None = None  # None: as many as n_heads (no grouped-query attention)
    vocab_size: int | None = None  # None: the tokenizer's size (data.tokenizer)
    # None: 4*dim for Type-I FFNs, 8/3*dim rounded up to ffn_multiple_of for Type-II, so that
    # both families hold the same 8*dim^2 projection parameters per layer.
    ffn_hidden: int | None = None
    ffn_multiple_of: int = 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)  # used when family is moe
    vision: VisionConfig = field(default_factory=VisionConfig)  # used when family is mae


@dataclass
class FFNConfig:
    name: str = MISSING
    # LA / MoA only (docs/design.md section 1); names or abbreviations: g s r r2 l t id.
    dict: list[str] | None = None  # Type-I dictionary, or Type-II gate branch; None: the default
    up_dict: list[str] | None = None  # Type-II up branch (bi, qd); None: [id, t, s]
    gate: str = "sigmoid"  # MoA gate function phi: sigmoid | tanh | softmax | linear
    gate_bias: bool = False
    gate_groups: int = 1  # gates per token per entry: one per group of hidden units
    # baseline: start exactly as relu2 / swiglu (the default since docs/results/typeI_ablation) | normalized: each
    # segment of gates starts summing to 1 | uniform: every gate at phi(0) (sigmoid: 0.5, a K-entry mixture sums to K/2)
    init: str = "baseline"
    gate_init_std: float = 0.0  # MoA gate weights U ~ N(0, std^2); 0: zeros, so the gates start input-independent
    kernel: str = "auto"  # auto | compiled | eager: how the mixing is run (see ffn/kernels.py)
    # relu2 / swiglu only: widen the hidden layer to hold at least this variant's parameters (the
    # parameter-matched control, e.g. swiglu with match_params_of=qd_moa); None: the usual width
    match_params_of: str | None = None


@dataclass
class GroupConfig:
    lr: float | None = None  # None: optim.lr
    weight_decay: float | None = None  # None: optim.weight_decay (matrix, embedding, head) or 0 (vector, mixing)


@dataclass
class OptimGroups:
    """Per-role overrides; the roles are described in moa_train/optim.py."""

    matrix: GroupConfig = field(default_factory=GroupConfig)
    embedding: GroupConfig = field(default_factory=GroupConfig)
    head: GroupConfig = field(default_factory=GroupConfig)
    vector: GroupConfig = field(default_factory=GroupConfig)
    mixing: GroupConfig = field(default_factory=GroupConfig)


@dataclass
class MuonConfig:
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5  # Newton-Schulz iterations
    # match_adamw: update RMS = update_rms, so optim.lr and weight decay carry over from AdamW
    # (Moonlight); spectral: Keller Jordan's max(1, rows/cols)^0.5, which wants lr ~ 0.02.
    update_scale: str = "match_adamw"
    update_rms: float = 0.2
    ns_dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9  # AdamW (with optim=muon: the AdamW groups)
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # How torch's AdamW steps the parameters (the numbers agree to float rounding): fused (one kernel
    # per parameter, CPU and GPU) | foreach (per-op over all tensors) | for-loop (per tensor)
    implementation: str = "fused"
    groups: OptimGroups = field(default_factory=OptimGroups)
    muon: MuonConfig = field(default_factory=MuonConfig)


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    warmup_steps: int | None = None  # None: warmup_frac of the total steps
    warmup_frac: float = 0.02
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * optim.lr
    decay_frac: float = 0.2  # wsd: the decay phase is the last decay_frac of the steps
    decay_shape: str = "linear"  # wsd decay: linear | sqrt | cosine


@dataclass
class TokenizerConfig:
    vocab_size: int | None = None  # size of the BPE trained on the corpus; None: model.vocab_size
    path: str | None = None  # a tokenizer.json (or a directory holding one) to load instead of training
    pretrained: str | None = None  # a hub name for Tokenizer.from_pretrained, e.g. gpt2 (needs the hub)
    eot: str | None = None  # end-of-document token of a loaded tokenizer; None: <|endoftext|>, </s>, ...
    train_chars: int | None = None  # the BPE trains on the corpus's first train_chars characters; None: all


@dataclass
class ImageDataConfig:
    """data.source=images (moa_train/data/images.py)."""

    val_fraction: float = 0.1  # files held out for validation, chosen by a hash of their path
    max_val_images: int | None = 1024  # at most this many of them are evaluated; None: all
    workers: int = 2  # decoding processes per training process; 0: decode in the training process
    max_bad_files: int = 10  # undecodable or too-small files skipped (each warned about) before the run stops
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # random resized crop's area range
    flip: bool = True  # random horizontal flips in training


@dataclass
class DataConfig:
    source: str = "shakespeare"  # shakespeare | pydocs | local | hf | mixture (see docs/data.md)
    name: str = "shakespeare"  # the corpus: the source's name, or for hf the hub dataset (HuggingFaceFW/fineweb-edu)
    path: str | None = None  # local: a file, directory or glob; pydocs: where the package was extracted
    parts: list[str] | None = None  # mixture: offline sources (shakespeare, pydocs) and local paths, read as one
    text_key: str = "text"  # the text field of .jsonl/.json/.parquet records and hub datasets
    subset: str | None = None  # hf: its configuration, e.g. sample-10BT
    split: str = "train"  # hf
    revision: str | None = None  # hf: a commit, tag or branch; None: main
    streaming: bool = True  # hf: stream instead of downloading the whole split first
    max_documents: int | None = None  # read at most this many documents (bounds a streamed dataset)
    shard_tokens: int = 1 << 28  # tokens per shard file (512 MiB of uint16)
    verify: str = "auto"  # checksums on load: auto (full up to 4 GiB of tokens, sizes beyond) | full | size
    cache_dir: str | None = None  # None: $MOA_TRAIN_CACHE, else ~/.cache/moa_train
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    images: ImageDataConfig = field(default_factory=ImageDataConfig)  # data=images only


@dataclass
class BudgetConfig:
    tokens_per_param: float = 20.0
    count: str = "active"  # which parameter count the budget multiplies
    # baseline: count the parameters of the variant's baseline FFN (relu2 / swiglu) at this model size,
    # so every variant of a size trains on the same tokens; own: the variant's own count
    params_of: str = "baseline"
    # Vision (model.family=mae): the budget in images seen, or in epochs of the training split; either
    # replaces tokens_per_param. None: tokens_per_param, a token being an image patch.
    images: int | None = None
    epochs: float | None = None


@dataclass
class DistConfig:
    name: str = "auto"  # auto: none for one process, ddp under torchrun; or none | ddp | fsdp
    # How long a collective waits for a rank that is gone or stuck before the job fails (rather than
    # hanging until the scheduler's limit). It also bounds how long the other ranks wait while rank 0
    # prepares the data: prepare a large corpus beforehand with moa-prepare.
    timeout_s: float = 600.0


@dataclass
class LoggerConfig:
    name: str = "jsonl"
    project: str = "moa-train"
    entity: str | None = None
    # wandb: offline by default so that a run never waits on the network; `online` to sync.
    mode: str = "offline"
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    seq_len: int = 256
    batch_size: int = 16  # global batch in sequences, summed over processes and accumulation
    micro_batch_size: int | None = None  # per process; None: the whole per-process share
    max_steps: int | None = None  # overrides the token budget
    eval_every: int = 100
    eval_tokens: int = 32768
    eval_at_start: bool = True
    log_every: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA, float32 on CPU
    compile: bool | None = None  # None: on for CUDA, off on CPU (no gain at small CPU sizes)
    # Recompute blocks' activations in the backward pass to save memory: none | full (every block) |
    # selective (every activation_checkpointing_every-th block)
    activation_checkpointing: str = "none"
    activation_checkpointing_every: int = 2
    # The output head and cross-entropy computed this many tokens at a time, gradients included, so the
    # whole logits tensor never exists (loss.py); null: sized from the vocabulary (16 MiB of logits per
    # chunk on CPU, 1 GiB on GPU); 0: plain F.cross_entropy over all logits
    loss_chunk_tokens: int | None = None
    # Attention heads narrower than this are zero-padded to it before SDPA (same numbers: model.attention);
    # null: 16 on CPU, where the flash kernel runs narrow heads slowly, off elsewhere; 0: off
    attention_min_head_dim: int | None = None
    # Causal self-attention over 128-512 positions as two SDPA calls, the halves of the queries, so that the
    # quarter of the scores above the diagonal is never computed (the same numbers to rounding:
    # model.causal_in_halves); null: on CPU, whose flash kernel computes it otherwise, off elsewhere
    attention_split_queries: bool | None = None
    progress: bool = True
    threads: int | None = None  # CPU threads of this process's torch ops; None: torch's default (all cores)
    # CPU: glibc's malloc keeps freed memory for the next step instead of returning it to the kernel, so a
    # step's tensors do not fault in fresh pages (hardware.reuse_freed_memory; the resident set stays at its
    # peak). Process-wide once set; left alone where MALLOC_* or LD_PRELOAD tunes the allocator.
    cpu_reuse_freed_memory: bool = True
    # CPU, float32: the linear layers' products through oneDNN or torch's BLAS (MKL), the same numbers to
    # rounding (linear.py); auto: oneDNN on a CPU that is not Intel's, whose MKL takes a slow path there
    cpu_linear: str = "auto"
    # Per device, for MFU; None: the datasheet figure of a known GPU, or on CPU a matmul probe (hardware.py)
    peak_tflops: float | None = None
    ckpt_every: int | None = 1000  # steps between checkpoints; None: only at the end and on SIGTERM/SIGUSR1
    ckpt_at_end: bool = True
    keep_checkpoints: int | None = 3  # newest complete checkpoints kept; None: all
    resume: str = "auto"  # auto: newest checkpoint of the run directory that verifies | never | a checkpoint path
    # Updates with a non-finite loss or gradient norm skipped (each logged) before the run counts as diverged
    skip_nonfinite_steps: int = 0
    # A checkpoint (or a run directory: its newest) or a moa-export directory whose weights a new run starts
    # from (continual pretraining, a decay branch); model and ffn must match, the optimizer starts fresh
    init_from: str | None = None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dry_run: bool = False


# Keys that do not change what a run computes: a finished run with other values is the same run
# (train.py skips it; the run directory's name leaves them out, so rerunning with other values
# finds it), and runs that differ only there are compared (moa-report). A key covers its subkeys.
NOT_THE_RUN = ("train.progress", "train.threads", "train.cpu_reuse_freed_memory", "train.resume", "train.ckpt_every",
               "train.ckpt_at_end", "train.keep_checkpoints", "train.skip_nonfinite_steps", "train.log_every",
               "train.peak_tflops", "train.activation_checkpointing", "train.activation_checkpointing_every",
               "train.compile", "logger", "train.loss_chunk_tokens", "train.attention_min_head_dim",
               "train.attention_split_queries", "train.cpu_linear",
               "optim.implementation", "dry_run", "dist", "sweep", "hydra", "data.cache_dir", "data.verify",
               "data.images.workers")


def run_name(overrides) -> str:
    """A run directory's name from the command line's overrides (Hydra's hydra.overrides.task).

    As Hydra's override_dirname (key=value, sorted, comma-separated), but leaving out every key under
    NOT_THE_RUN, so that `train.log_every=10` names the same run as no override at all.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    kept = sorted(f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in parsed
                  if not under(o.key_or_group, NOT_THE_RUN))
    name = ",".join(kept)
    if not name:
        return "default"
    flat = name.replace(os.sep, "%")  # data.path=/a/b must not nest directories
    if len(flat) > 150:  # file names stop at 255 bytes; keep a readable head and a hash
        flat = flat[:130] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return flat


def register_configs() -> None:
    """The schemas in Hydra's ConfigStore and the run-name resolver: call once before composing."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    OmegaConf.register_new_resolver("moa_run_name", run_name, replace=True)


def compose_run_config(overrides: list[str]) -> DictConfig:
    """The config `moa-train OVERRIDES` would run, composed without starting a Hydra app (for the
    other tools: moa-prepare, moa-bench, benchmarks)."""
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module(config_module="moa_train.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@functools.cache
def _schema_leaves() -> dict[str, Any]:
    return {k: v for k, v in flatten(OmegaConf.to_container(OmegaConf.structured(RunConfig))).items() if v != MISSING}


def flat_with_defaults(recorded: dict) -> dict[str, Any]:
    """A recorded config as {'dotted.key': value}, with every key the schema gained since it was written at
    its default (a run recorded before a key existed compares equal to one that leaves the key at its default),
    and without the ffn keys its FFN does not read (a relu2 run is the same whatever ffn.init says)."""
    flat = flatten(recorded)
    flat = {**{k: v for k, v in _schema_leaves().items() if k not in flat}, **flat}
    unused = {f"ffn.{key}" for key in unused_keys(str(flat.get("ffn.name")))}  # e.g. ffn.init of relu2
    return {k: v for k, v in flat.items() if k not in unused}


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- value checks, one per group

BUDGET_COUNTS = ("total", "active", "non_embedding")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
ADAMW_IMPLEMENTATIONS = ("fused", "foreach", "for-loop")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")  # parallel.apply_activation_checkpointing
CPU_LINEAR = ("auto", "blas", "onednn")  # linear.set_cpu_linear
LOGGERS = ("jsonl", "wandb")
WANDB_MODES = ("offline", "online", "disabled")
MODEL_FAMILIES = ("dense", "moe", "mae")  # mae: a ViT masked autoencoder, trained on data=images


def validate_config(cfg: DictConfig) -> None:
    """Check every value before compute starts; raise ConfigError naming the key."""
    from .data import check_data_config
    from .ffn import validate_ffn_config

    # Resolving first turns a broken interpolation into a clean error naming the key.
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:  # omegaconf raises several unrelated types here
        raise ConfigError(getattr(exc, "full_key", "?"), f"cannot be resolved ({exc}).") from None
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        key = sorted(missing)[0]
        raise ConfigError(key, "has no value.", "set it on the command line, e.g. " + f"{key}=...")
    _check_model(cfg.model)
    validate_ffn_config(cfg.ffn, cfg.model)
    _check_optim(cfg.optim)
    _check_schedule(cfg.schedule)
    check_data_config(cfg.data, cfg.model.vocab_size)  # source, keys, tokenizer size (moa_train/data/checks.py)
    _check_budget(cfg.budget)
    _check_family_data(cfg)
    _check_dist_and_logger(cfg.dist, cfg.logger)
    _check_train(cfg.train, vision=cfg.model.family == "mae")
    every = cfg.train.activation_checkpointing_every
    if cfg.train.activation_checkpointing == "selective" and every > cfg.model.n_layers:
        raise ConfigError("train.activation_checkpointing_every",
                          f"{every} is more than the model's "
                          f"{cfg.model.n_layers} blocks, so no block would be checkpointed.",
                          f"1 to {cfg.model.n_layers} (1 is full)")


def _check_model(m: DictConfig) -> None:
    check_choice("model.family", m.family, MODEL_FAMILIES)
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden", "ffn_multiple_of",
                "rope_theta", "norm_eps", "init_std"):
        check_positive(f"model.{key}", m[key])
    if m.dim % m.n_heads:
        raise ConfigError("model.n_heads", f"{m.n_heads} does not divide model.dim={m.dim}.")
    if (m.dim // m.n_heads) % 2 and m.family != "mae":
        raise ConfigError("model.dim", f"head dimension {m.dim // m.n_heads} must be even for RoPE.")
    n_kv = m.n_kv_heads or m.n_heads
    if m.n_heads % n_kv:
        raise ConfigError("model.n_kv_heads", f"{n_kv} does not divide model.n_heads={m.n_heads}.")
    if m.family == "moe":
        _check_moe(m.moe)
    if m.family == "mae":
        _check_vision(m)


def _check_family_data(cfg: DictConfig) -> None:
    """Vision models train on images and language models on text; budgets in images are for images."""
    vision, images = cfg.model.family == "mae", cfg.data.source == "images"
    if vision and not images:
        raise ConfigError("data.source", f"is '{cfg.data.source}', text, but model={cfg.model.name} is a vision model "
                          "(model.family=mae), which trains on images.", "data=images (data.path=DIR, or null for "
                          "the offline set)")
    if images and not vision:
        raise ConfigError("data.source", f"is images, but model={cfg.model.name} is a language model "
                          f"(model.family={cfg.model.family}).", "a text source (shakespeare, pydocs, local, hf, "
                          "mixture), or a vision model: model=mae_tiny, mae_vit_b16, ...")
    if not vision and (cfg.budget.images is not None or cfg.budget.epochs is not None):
        raise ConfigError("budget.images" if cfg.budget.images is not None else "budget.epochs",
                          "is a budget for vision models (model.family=mae); a language model's budget is "
                          "budget.tokens_per_param.", "null")


def _check_vision(m: DictConfig) -> None:
    v = m.vision
    for key in ("ffn_hidden", "n_kv_heads"):
        if m[key] is not None:
            raise ConfigError(f"model.{key}", f"is {m[key]}, but a vision model (model.family=mae) does not read it: "
                              "its FFN widths follow from model.dim and model.vision.decoder_dim, and its "
                              "attention has no grouped keys.", "null")
    if v.channels != 3:
        raise ConfigError("model.vision.channels", f"is {v.channels}; data=images decodes every file to RGB.", "3")
    for key in ("image_size", "patch_size", "channels", "decoder_dim", "decoder_layers", "decoder_heads"):
        check_positive(f"model.vision.{key}", v[key])
    if v.image_size % v.patch_size:
        fits = [p for p in (4, 8, 14, 16, 32) if v.image_size % p == 0]
        raise ConfigError("model.vision.patch_size", f"{v.patch_size} does not divide model.vision.image_size="
                          f"{v.image_size}, so the image is not a whole grid of patches.",
                          "a divisor of the image size" + (f", e.g. {', '.join(map(str, fits))}" if fits else ""))
    if v.decoder_dim % v.decoder_heads:
        raise ConfigError("model.vision.decoder_heads", f"{v.decoder_heads} does not divide "
                          f"model.vision.decoder_dim={v.decoder_dim}.")
    if not 0 < v.mask_ratio < 1:
        raise ConfigError("model.vision.mask_ratio", f"got {v.mask_ratio}; some patches must be seen and some "
                          "masked.", "a fraction strictly between 0 and 1, e.g. 0.75")
    from .mae import visible_patches

    if visible_patches((v.image_size // v.patch_size) ** 2, v.mask_ratio) < 1:
        raise ConfigError("model.vision.mask_ratio", f"{v.mask_ratio} masks every one of the "
                          f"{(v.image_size // v.patch_size) ** 2} patches.", "a smaller ratio")


def _check_moe(moe: DictConfig) -> None:
    from .moe import GROUPED_MM, SCORES

    if moe.n_experts < 1:
        raise ConfigError("model.moe.n_experts", f"got {moe.n_experts}; an MoE layer needs at least one expert.")
    if not 1 <= moe.top_k <= moe.n_experts:
        raise ConfigError("model.moe.top_k", f"got {moe.top_k}; each token visits between 1 and model.moe.n_experts="
                          f"{moe.n_experts} experts.")
    for key in ("n_shared_experts", "bias_update_coef", "aux_loss_coef"):
        check_positive(f"model.moe.{key}", moe[key], allow_zero=True)
    for key in ("expert_hidden", "route_scale"):
        check_positive(f"model.moe.{key}", moe[key])
    check_choice("model.moe.score", moe.score, SCORES)
    check_choice("model.moe.grouped_mm", moe.grouped_mm, GROUPED_MM)


def _check_optim(o: DictConfig) -> None:
    from .optim import OPTIMIZERS, ROLES

    check_choice("optim.name", o.name, OPTIMIZERS)
    check_positive("optim.lr", o.lr)
    check_positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    check_positive("optim.eps", o.eps)
    check_positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    check_choice("optim.implementation", o.implementation, ADAMW_IMPLEMENTATIONS)
    for role in ROLES:
        check_positive(f"optim.groups.{role}.lr", o.groups[role].lr)
        check_positive(f"optim.groups.{role}.weight_decay", o.groups[role].weight_decay, allow_zero=True)
    check_choice("optim.muon.update_scale", o.muon.update_scale, ("match_adamw", "spectral"))
    check_choice("optim.muon.ns_dtype", o.muon.ns_dtype, ("auto", "float32", "bfloat16"))
    check_positive("optim.muon.ns_steps", o.muon.ns_steps)
    check_positive("optim.muon.update_rms", o.muon.update_rms)
    check_fraction("optim.beta1", o.beta1, closed_above=False)
    check_fraction("optim.beta2", o.beta2, closed_above=False)
    check_fraction("optim.muon.momentum", o.muon.momentum, closed_above=False)


def _check_schedule(s: DictConfig) -> None:
    from .schedule import DECAY_SHAPES, SCHEDULES

    check_choice("schedule.name", s.name, sorted(SCHEDULES))
    check_choice("schedule.decay_shape", s.decay_shape, DECAY_SHAPES)
    check_positive("schedule.warmup_steps", s.warmup_steps, allow_zero=True)
    for key in ("warmup_frac", "min_lr_ratio", "decay_frac"):
        check_fraction(f"schedule.{key}", s[key])


def _check_budget(b: DictConfig) -> None:
    check_positive("budget.tokens_per_param", b.tokens_per_param)
    check_choice("budget.count", b.count, BUDGET_COUNTS)
    check_choice("budget.params_of", b.params_of, ("baseline", "own"))
    check_positive("budget.images", b.images)
    check_positive("budget.epochs", b.epochs)
    if b.images is not None and b.epochs is not None:
        raise ConfigError("budget.images", "and budget.epochs are both set; the budget is one of them.",
                          "budget.images=N or budget.epochs=E, the other null")


def _check_dist_and_logger(dist: DictConfig, logger: DictConfig) -> None:
    from .distributed import DIST_MODES

    check_choice("dist.name", dist.name, DIST_MODES)
    check_positive("dist.timeout_s", dist.timeout_s)
    check_choice("logger.name", logger.name, LOGGERS)
    check_choice("logger.mode", logger.mode, WANDB_MODES)


def _check_loss_chunk(chunk: int | None, seq_len: int) -> None:
    """Chunks must tile every micro-batch (whole sequences), so a chunk divides a sequence or is a
    multiple of one; anything else would leave a ragged last chunk in every step."""
    if chunk is None:
        return
    check_positive("train.loss_chunk_tokens", chunk, allow_zero=True)
    if chunk and seq_len % chunk and chunk % seq_len:
        divisors = [d for d in (seq_len // 8, seq_len // 4, seq_len // 2) if d and seq_len % d == 0]
        raise ConfigError("train.loss_chunk_tokens",
                          f"{chunk} neither divides train.seq_len={seq_len} nor is a multiple of it.",
                          "0 (off), a divisor of train.seq_len (e.g. " + ", ".join(map(str, divisors))
                          + f") or a multiple of it (e.g. {seq_len}, {4 * seq_len})")


def _check_train(t: DictConfig, vision: bool = False) -> None:
    check_positive("train.keep_checkpoints", t.keep_checkpoints)
    check_positive("train.peak_tflops", t.peak_tflops)
    for key in ("seq_len", "batch_size", "micro_batch_size", "max_steps", "eval_every", "eval_tokens", "log_every",
                "ckpt_every", "threads"):
        check_positive(f"train.{key}", t[key])
    for key in ("skip_nonfinite_steps", "attention_min_head_dim"):
        check_positive(f"train.{key}", t[key], allow_zero=True)
    if t.device.split(":")[0] not in DEVICES:
        raise ConfigError("train.device", f"unknown value '{t.device}'.", "auto, cpu, cuda, cuda:N")
    if t.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.device", f"'{t.device}' requested but no CUDA device is available.",
                              "auto, cpu")
    check_choice("train.dtype", t.dtype, DTYPES)
    check_choice("train.activation_checkpointing", t.activation_checkpointing, ACTIVATION_CHECKPOINTING)
    check_choice("train.cpu_linear", t.cpu_linear, CPU_LINEAR)
    check_positive("train.activation_checkpointing_every", t.activation_checkpointing_every)
    if vision:  # no vocabulary head, and validation is every validation image: the text keys below do not apply
        return
    _check_loss_chunk(t.loss_chunk_tokens, t.seq_len)
    if t.eval_tokens < t.seq_len:
        raise ConfigError("train.eval_tokens",
                          f"{t.eval_tokens} is shorter than one sequence (train.seq_len={t.seq_len}).")
