"""Config schemas (one dataclass per Hydra group) and the value checks Hydra cannot express.

The YAML files under conf/ are merged onto `RunConfig`, so an unknown key or a value of the
wrong type in any group is refused by OmegaConf while Hydra composes the config. Range and
choice checks live in `validate_config`, which runs before any data is read or model built.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import ConfigError


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


@dataclass
class FFNConfig:
    name: str = MISSING
    # LA / MoA only (DESIGN.md section 1); names or abbreviations: g s r r2 l t id.
    dict: list[str] | None = None  # Type-I dictionary, or Type-II gate branch; None: the default
    up_dict: list[str] | None = None  # Type-II up branch (bi, qd); None: [id, t, s]
    gate: str = "sigmoid"  # MoA gate function phi: sigmoid | tanh | softmax | linear
    gate_bias: bool = False
    gate_groups: int = 1  # gates per token per entry: one per group of hidden units
    init: str = "uniform"  # uniform | baseline (start exactly as relu2 / swiglu)
    kernel: str = "auto"  # auto | compiled | eager: how the mixing is run (see ffn/mixing.py)


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
class DataConfig:
    source: str = "shakespeare"  # shakespeare | pydocs | local | hf (see docs/data.md)
    name: str = "shakespeare"  # the corpus: the source's name, or for hf the hub dataset (HuggingFaceFW/fineweb-edu)
    path: str | None = None  # local: a file, directory or glob; pydocs: where the package was extracted
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


@dataclass
class BudgetConfig:
    tokens_per_param: float = 20.0
    count: str = "active"  # which parameter count the budget multiplies
    # baseline: count the parameters of the variant's baseline FFN (relu2 / swiglu) at this model size,
    # so every variant of a size trains on the same tokens; own: the variant's own count
    params_of: str = "baseline"


@dataclass
class DistConfig:
    name: str = "auto"  # auto: none for one process, ddp under torchrun; or none | ddp | fsdp


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
    progress: bool = True
    peak_tflops: float | None = None  # per device, for MFU; None: looked up for known GPUs, no MFU on CPU
    ckpt_every: int | None = 1000  # steps between checkpoints; None: only at the end and on SIGTERM/SIGUSR1
    ckpt_at_end: bool = True
    keep_checkpoints: int | None = 3  # newest complete checkpoints kept; None: all
    resume: str = "auto"  # auto: newest complete checkpoint of the run directory | never | a checkpoint path


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


def run_name(override_dirname: str) -> str:
    """A directory name from the command line's overrides (Hydra's override_dirname)."""
    if not override_dirname:
        return "default"
    name = override_dirname.replace(os.sep, "%")  # data.path=/a/b must not nest directories
    if len(name) > 150:  # file names stop at 255 bytes; keep a readable head and a hash
        name = name[:130] + "-" + hashlib.sha256(override_dirname.encode()).hexdigest()[:12]
    return name


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    OmegaConf.register_new_resolver("moa_run_name", run_name, replace=True)


register_configs()


# ----------------------------------------------------------------------------- value checks

BUDGET_COUNTS = ("total", "active", "non_embedding")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
LOGGERS = ("jsonl", "wandb")
WANDB_MODES = ("offline", "online", "disabled")
MODEL_FAMILIES = ("dense", "moe")


def _positive(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(key, f"got {value}, must be {bound}.")


def _choice(cfg: DictConfig, key: str, accepted: tuple[str, ...] | list[str]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in accepted:
        raise ConfigError(key, f"unknown value '{value}'.", ", ".join(accepted))


def _fraction(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(key, f"got {value}, must lie in [0, 1].")


def validate_config(cfg: DictConfig) -> None:
    """Check every value before compute starts; raise ConfigError naming the key."""
    from .data import check_data_config
    from .distributed import DIST_MODES
    from .ffn import FFN_REGISTRY, ffn_hidden_dim
    from .ffn.mixtures import validate_ffn_config
    from .schedule import DECAY_SHAPES, SCHEDULES

    # Resolving first turns a broken interpolation into a clean error naming the key.
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:  # omegaconf raises several unrelated types here
        raise ConfigError(getattr(exc, "full_key", "?"), f"cannot be resolved ({exc}).") from None
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        key = sorted(missing)[0]
        raise ConfigError(key, "has no value.", "set it on the command line, e.g. " + f"{key}=...")

    _choice(cfg, "model.family", MODEL_FAMILIES)
    for key in ("model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.vocab_size",
                "model.ffn_hidden", "model.ffn_multiple_of", "model.rope_theta", "model.norm_eps",
                "model.init_std"):
        _positive(cfg, key)
    m = cfg.model
    if m.dim % m.n_heads:
        raise ConfigError("model.n_heads", f"{m.n_heads} does not divide model.dim={m.dim}.")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError("model.dim", f"head dimension {m.dim // m.n_heads} must be even for RoPE.")
    n_kv = m.n_kv_heads or m.n_heads
    if m.n_heads % n_kv:
        raise ConfigError("model.n_kv_heads", f"{n_kv} does not divide model.n_heads={m.n_heads}.")

    if m.family == "moe":
        _validate_moe(cfg)
    _choice(cfg, "ffn.name", sorted(FFN_REGISTRY))
    validate_ffn_config(cfg.ffn, ffn_hidden_dim(m.dim, cfg.ffn.name, m.ffn_hidden, m.ffn_multiple_of))

    _choice(cfg, "optim.name", ("adamw", "muon"))
    _positive(cfg, "optim.lr")
    _positive(cfg, "optim.weight_decay", allow_zero=True)
    _positive(cfg, "optim.eps")
    _positive(cfg, "optim.grad_clip", allow_zero=True)
    for role in ("matrix", "embedding", "head", "vector", "mixing"):
        _positive(cfg, f"optim.groups.{role}.lr")
        _positive(cfg, f"optim.groups.{role}.weight_decay", allow_zero=True)
    _choice(cfg, "optim.muon.update_scale", ("match_adamw", "spectral"))
    _choice(cfg, "optim.muon.ns_dtype", ("auto", "float32", "bfloat16"))
    _positive(cfg, "optim.muon.ns_steps")
    _positive(cfg, "optim.muon.update_rms")
    for key in ("optim.beta1", "optim.beta2", "optim.muon.momentum"):
        value = OmegaConf.select(cfg, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(key, f"got {value}, must lie in [0, 1).")

    _choice(cfg, "schedule.name", sorted(SCHEDULES))
    _choice(cfg, "schedule.decay_shape", DECAY_SHAPES)
    _positive(cfg, "schedule.warmup_steps", allow_zero=True)
    for key in ("schedule.warmup_frac", "schedule.min_lr_ratio", "schedule.decay_frac"):
        _fraction(cfg, key)

    check_data_config(cfg.data, m.vocab_size)  # source, keys, tokenizer size (moa_train/data/checks.py)

    _positive(cfg, "train.keep_checkpoints")
    _positive(cfg, "train.peak_tflops")
    _positive(cfg, "budget.tokens_per_param")
    _choice(cfg, "budget.count", BUDGET_COUNTS)
    _choice(cfg, "budget.params_of", ("baseline", "own"))
    _choice(cfg, "dist.name", DIST_MODES)
    _choice(cfg, "logger.name", LOGGERS)
    _choice(cfg, "logger.mode", WANDB_MODES)

    for key in ("train.seq_len", "train.batch_size", "train.micro_batch_size", "train.max_steps",
                "train.eval_every", "train.eval_tokens", "train.log_every", "train.ckpt_every"):
        _positive(cfg, key)
    device = cfg.train.device
    if device.split(":")[0] not in DEVICES:
        raise ConfigError("train.device", f"unknown value '{device}'.", "auto, cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.device", f"'{device}' requested but no CUDA device is available.",
                              "auto, cpu")
    _choice(cfg, "train.dtype", DTYPES)
    if cfg.train.eval_tokens < cfg.train.seq_len:
        raise ConfigError("train.eval_tokens",
                          f"{cfg.train.eval_tokens} is shorter than one sequence (train.seq_len="
                          f"{cfg.train.seq_len}).")


def _validate_moe(cfg: DictConfig) -> None:
    from .moe import GROUPED_MM, SCORES

    moe = cfg.model.moe
    if moe.n_experts < 1:
        raise ConfigError("model.moe.n_experts", f"got {moe.n_experts}; an MoE layer needs at least one expert.")
    if not 1 <= moe.top_k <= moe.n_experts:
        raise ConfigError("model.moe.top_k", f"got {moe.top_k}; each token visits between 1 and model.moe.n_experts="
                          f"{moe.n_experts} experts.")
    _positive(cfg, "model.moe.n_shared_experts", allow_zero=True)
    _positive(cfg, "model.moe.expert_hidden")
    _positive(cfg, "model.moe.route_scale")
    _positive(cfg, "model.moe.bias_update_coef", allow_zero=True)
    _positive(cfg, "model.moe.aux_loss_coef", allow_zero=True)
    _choice(cfg, "model.moe.score", SCORES)
    _choice(cfg, "model.moe.grouped_mm", GROUPED_MM)


def expand_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


# Keys that do not change what a run computes: a finished run with other values is the same run
# (train.py skips it), and runs that differ only there are compared (moa-report).
NOT_THE_RUN = ("train.progress", "train.resume", "train.ckpt_every", "train.ckpt_at_end", "train.keep_checkpoints",
               "train.log_every", "train.peak_tflops", "logger", "dry_run", "dist", "sweep", "hydra",
               "data.cache_dir", "data.verify")


def flatten(tree, prefix: str = "") -> dict[str, Any]:
    """A nested config as {'dotted.key': value}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def under(key: str, prefixes: tuple[str, ...]) -> bool:
    """Whether a dotted key is one of `prefixes` or inside one of them."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)
