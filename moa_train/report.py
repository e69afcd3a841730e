"""`moa-report DIR... [--out DIR]`: compare FFN variants the way the paper does.

Runs (single runs or Hydra multirun sweeps, found recursively by their summary.json, metrics.jsonl
or .hydra/config.yaml) are grouped by what must be equal for a fair comparison: model size, token
budget, optimizer, schedule, and every other setting that changes the numbers (data, sequence
length, batch, optimizer settings other than the LR...); groups of the same name are told apart by
the keys in which they differ. Within a group each variant's learning rate is tuned: the best LR
is the one whose terminal validation loss, averaged over seeds, is lowest. The report gives each
variant's terminal loss at its best LR, the spread over seeds, and the relative loss against the
group's baseline (swiglu for Type-II variants, relu2 for Type-I, gelu in a vision model),
`(L - L_base) / L_base`, and says
whether the difference is larger than the seeds' spread. Runs that failed, diverged or did not
finish are listed, never silently dropped. A variant run at one learning rate only was not tuned:
the report and the plots say so ("LR not tuned: one value").

Outputs in --out: report.md, report.json, and PNG plots (validation loss against tokens at the best
LR, terminal loss against LR, and terminal loss against parameters across model sizes). In the
plots the baselines (relu2, swiglu) are black and dashed, token and parameter counts read 250k or
1.2M, the learning-rate axis is ticked at the rates that were run (4e-3, 8e-3...) and the loss axis
at round values.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from .config import NOT_THE_RUN, FFNConfig, flat_with_defaults
from .ffn import FFN_REGISTRY
from .metrics import read_summary
from .utils import in_forked_shares, under
from .zero_shot import PAPER_TASKS

# ffn keys that make two runs of the same ffn name different variants
VISION_BASELINE = "gelu"  # the ViT's MLP: every FFN of a vision model (model.family=mae) is compared with it
VARIANT_KEYS = ("dict", "up_dict", "gate", "gate_bias", "gate_init_std", "gate_groups", "init", "match_params_of")


@dataclass
class Run:
    path: Path
    status: str  # completed | diverged | preempted | failed | unfinished
    config: dict
    summary: dict = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, val_loss)
    reason: str = ""
    mtime: float = 0.0  # of summary.json: of two runs of the same point, the newer one counts

    @property
    def val_loss(self) -> float | None:
        return self.summary.get("val_loss") if self.status == "completed" else None

    @property
    def ffn(self) -> str:
        return self.config["ffn"]["name"]

    @property
    def lr(self) -> float:
        return float(self.config["optim"]["lr"])

    @property
    def seed(self) -> int:
        return int(self.config["train"]["seed"])

    @property
    def variant(self) -> str:
        """The ffn name, plus its non-default keys (e.g. `qd_moa[gate=tanh]`)."""
        defaults = _ffn_defaults(self.ffn)
        spec = FFN_REGISTRY.get(self.ffn)
        keys = ("match_params_of",) if spec is not None and spec.is_baseline else VARIANT_KEYS  # the rest: unused
        changed = [f"{k}={_short(self.config['ffn'].get(k))}" for k in keys
                   if k in defaults and k in self.config["ffn"] and self.config["ffn"][k] != defaults[k]]
        return self.ffn + (f"[{','.join(changed)}]" if changed else "")

    @property
    def label(self) -> tuple[str, str, str, str]:
        """The group's name: model, token budget, optimizer, schedule."""
        train, budget = self.config["train"], self.config["budget"]
        if train.get("max_steps"):
            tokens = f"{train['max_steps']} steps"
        elif budget.get("epochs") is not None:
            tokens = f"{_short(budget['epochs'])} epochs"
        elif budget.get("images") is not None:
            tokens = f"{budget['images']:,} images"
        else:
            tokens = f"{_short(budget['tokens_per_param'])} tokens/param"
        return (self.config["model"]["name"], tokens, self.config["optim"]["name"], self.config["schedule"]["name"])

    @property
    def baseline(self) -> str:
        """What this run's FFN is compared with: its registry baseline (relu2, swiglu), or for a vision model
        the ViT's own MLP, gelu."""
        if self.config["model"].get("family") == "mae":
            return VISION_BASELINE
        spec = FFN_REGISTRY.get(self.ffn)
        return spec.baseline if spec is not None else self.ffn

    @property
    def setting(self) -> dict[str, object]:
        """Every config key that must be equal for two runs to be compared (dotted keys)."""
        return {k: v for k, v in flat_with_defaults(self.config).items() if not under(k, NOT_COMPARED)}

    @property
    def group(self) -> tuple:
        return (*self.label, json.dumps(self.setting, sort_keys=True, default=str))


# Besides what does not change a run at all (config.NOT_THE_RUN), keys that may differ inside a
# comparison: what is compared (the FFN variant, its learning rate, the seed) and what changes the
# numbers only within float noise (placement, compilation, micro-batching, evaluation cadence).
NOT_COMPARED = (*NOT_THE_RUN, "ffn", "optim.lr", "train.seed", "train.eval_every", "train.compile",
                "train.device", "train.micro_batch_size")
# A model preset may also set its training shape: sizes compared across (scaling plots) may differ there.
SIZE_KEYS = ("model", "train.seq_len", "train.batch_size")


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


_DEFAULTS: dict[str, dict] = {}


def _ffn_defaults(name: str) -> dict:
    """What `ffn=name` sets today: the schema's defaults under conf/ffn/<name>.yaml."""
    if name not in _DEFAULTS:
        from importlib.resources import files

        path = files("moa_train.conf") / "ffn" / f"{name}.yaml"
        preset = OmegaConf.to_container(OmegaConf.load(str(path))) if path.is_file() else {}
        _DEFAULTS[name] = {**OmegaConf.to_container(OmegaConf.structured(FFNConfig)), **preset} if preset else {}
    return _DEFAULTS[name]


# ----------------------------------------------------------------------------- reading runs


def find_run_dirs(roots: list[Path]) -> list[Path]:
    markers = ("summary.json", "metrics.jsonl", ".hydra/config.yaml")
    found = set()
    for root in roots:
        for marker in markers:
            for path in root.rglob(marker):
                run = path.parent.parent if marker.startswith(".hydra") else path.parent
                if "checkpoints" not in run.relative_to(root).parts:  # a checkpoint's files are not a run
                    found.add(run)
    return sorted(found)


def read_run(path: Path) -> Run:
    summary = read_summary(path)
    config = (summary or {}).get("config")
    if config is None and (path / ".hydra" / "config.yaml").is_file():
        config = OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml"), resolve=False)
    if config is None:
        return Run(path, summary.get("status", "failed") if summary else "unfinished", {}, summary or {},
                   reason=(summary or {}).get("error", "no config recorded"))
    curve = []
    if (path / "metrics.jsonl").is_file():
        for line in (path / "metrics.jsonl").read_text().splitlines():
            try:
                row = json.loads(line) if line.strip() else {}
            except ValueError:  # a line cut short by a killed or still running run
                continue
            if isinstance(row, dict) and row.get("val_loss") is not None:
                curve.append((row.get("tokens", 0), row["val_loss"]))
    if summary is None:
        return Run(path, "unfinished", config, {}, curve, reason="no summary.json (running, killed or crashed)")
    status = summary.get("status", "completed")
    if status == "completed" and not _finite(summary.get("val_loss")):
        status = "diverged"  # finished, but its terminal loss is not a number
    reason = summary.get("error", "") or {"diverged": "loss became non-finite",
                                          "preempted": "stopped by a signal before the end"}.get(status, "")
    run = Run(path, status, config, summary, curve, reason)
    run.mtime = (path / "summary.json").stat().st_mtime
    return run


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ----------------------------------------------------------------------------- the comparison


@dataclass
class VariantResult:
    variant: str
    ffn: str
    baseline: str
    by_lr: dict[float, list[float]]  # terminal losses of the completed seeds, per learning rate
    best_lr: float
    losses: list[float]  # at the best LR, one per seed
    runs: list[Run]  # at the best LR
    params: dict
    tokens: int
    lr_at_edge: bool = False
    diverged: dict[float, int] = field(default_factory=dict)  # learning rate -> seeds that diverged there
    relative: float | None = None
    separated: bool | None = None  # seed ranges of the variant and its baseline do not overlap (2+ seeds each)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.losses)

    @property
    def std(self) -> float:
        return statistics.stdev(self.losses) if len(self.losses) > 1 else 0.0

    @property
    def lrs_tried(self) -> list[float]:
        """Every learning rate run, whether it completed or diverged."""
        return sorted(set(self.by_lr) | set(self.diverged))

    @property
    def lr_tuned(self) -> bool:
        """False for a one-value grid: the best LR is the only one tried, nothing was tuned."""
        return len(self.lrs_tried) > 1

    @property
    def is_baseline(self) -> bool:
        """The baseline itself (relu2, swiglu; gelu for vision), not a variant of it."""
        return self.ffn == self.baseline and self.variant == self.ffn


def compare(runs: list[Run]) -> dict[tuple, dict[str, VariantResult]]:
    """Per group, per variant: the best learning rate by mean terminal loss over seeds.

    A learning rate at which any seed diverged is never the best (one lucky seed must not pick an unstable
    rate), but it bounds the grid. Of two runs of the same variant, LR and seed in a group, the newer
    counts; the other is marked `duplicate` and listed with the runs not compared.
    """
    grouped: dict[tuple, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.config:
            grouped[run.group][run.variant].append(run)
    results = {}
    for group, variants in grouped.items():
        table = {}
        for variant, members in variants.items():
            members = _drop_duplicates(members)
            by_lr: dict[float, list[float]] = defaultdict(list)
            diverged: dict[float, int] = defaultdict(int)
            for run in members:
                if run.status == "completed":
                    by_lr[run.lr].append(run.val_loss)
                elif run.status == "diverged":
                    diverged[run.lr] += 1
            stable = [lr for lr in by_lr if lr not in diverged]
            if not stable:
                continue
            best_lr = min(stable, key=lambda lr: statistics.fmean(by_lr[lr]))
            best_runs = [r for r in members if r.lr == best_lr and r.status == "completed"]
            tried = sorted(set(by_lr) | set(diverged))
            table[variant] = VariantResult(
                variant, members[0].ffn, members[0].baseline, dict(by_lr), best_lr, by_lr[best_lr], best_runs,
                best_runs[0].summary.get("params", {}), best_runs[0].summary.get("tokens", 0),
                lr_at_edge=len(tried) > 1 and best_lr in (tried[0], tried[-1]), diverged=dict(diverged))
        for result in table.values():
            base = table.get(result.baseline)
            if base is None:
                continue
            result.relative = (result.mean - base.mean) / base.mean
            if result is not base and len(result.losses) > 1 and len(base.losses) > 1:
                result.separated = max(result.losses) < min(base.losses) or min(result.losses) > max(base.losses)
        results[group] = dict(sorted(table.items(), key=lambda kv: (FFN_REGISTRY.get(kv[1].ffn) is None,
                                                                     kv[1].baseline, kv[0] != kv[1].baseline,
                                                                     kv[0])))
    return dict(sorted(results.items()))


def _drop_duplicates(members: list[Run]) -> list[Run]:
    """Of the runs that count (completed or diverged) at one LR and seed, the newest; the others become `duplicate`."""
    newest: dict[tuple[float, int], Run] = {}
    counted = [r for r in members if r.status in ("completed", "diverged")]
    for run in sorted(counted, key=lambda r: (r.mtime, str(r.path))):
        key = (run.lr, run.seed)
        if key in newest and newest[key].status != "duplicate":
            older = newest[key]
            older.status, older.reason = "duplicate", f"the same variant, LR and seed as {run.path} (newer)"
        newest[key] = run
    return [r for r in members if r.status != "duplicate"]


def group_names(groups) -> dict[tuple, tuple[str, str]]:
    """Per group: the keys that tell it apart from groups of the same label ('' if none), and a file-name slug."""
    names = {}
    by_label = defaultdict(list)
    for group in groups:
        by_label[group[:4]].append(group)
    for label, same in by_label.items():
        settings = [json.loads(g[4]) for g in same]
        differing = sorted({k for a in settings for b in settings for k in a.keys() | b.keys() if a.get(k) != b.get(k)})
        for group, setting in zip(same, settings):
            extra = ", ".join(f"{k}={_short(setting.get(k))}" for k in differing)
            names[group] = (extra, _slug(label, group[4] if extra else None))
    return names


# ----------------------------------------------------------------------------- axis ticks (pure helpers)

UNTUNED = "LR not tuned: one value"
NICE_STEPS = (1, 2, 2.5, 5, 10)  # round tick spacings, times a power of ten
FIGURES_PER_PROCESS = 4  # fewer to draw: not worth a forked process


def format_count(x: float, pos: int | None = None) -> str:
    """A count of tokens or parameters as an axis reads it: 250k, 1.2M, 38.7k, 3B (three significant digits).

    `pos` is unused: it makes the function a matplotlib FuncFormatter.
    """
    for unit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        scaled = f"{x / unit:.3g}"
        if abs(float(scaled)) >= 1:  # 999,999 reads 1M, not 1e+03k
            return scaled + suffix
    return f"{x:.3g}"


def format_lr(x: float, pos: int | None = None) -> str:
    """A learning rate in short scientific notation: 4e-3, 1.6e-2, 2.5e-4 (a FuncFormatter too)."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def lr_grid(table: dict[str, VariantResult]) -> list[float]:
    """The learning rates a group ran (completed or diverged), in order: the LR axis is ticked at these."""
    return sorted({lr for result in table.values() for lr in result.lrs_tried})


def nice_ticks(low: float, high: float, n: int = 6) -> list[float]:
    """Round values in [low, high]: the finest spacing of 1, 2, 2.5 or 5 times a power of ten that gives at most
    n ticks (n >= 5 gives two at least)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        return [low]
    magnitude = 10 ** math.floor(math.log10((high - low) / n))
    for step in (s * magnitude * 10 ** k for k in (0, 1, 2) for s in NICE_STEPS[:-1]):
        first, last = math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9)
        if last - first + 1 <= n:
            break
    return [round(i * step, 12) for i in range(first, last + 1)]


def tick_labels(values: list[float]) -> list[str]:
    """One number of decimals for all ticks, the fewest that writes each exactly: 3.2 3.4, or 3.25 3.50."""
    decimals = max((len(f"{v:.9f}".rstrip("0").split(".")[1]) for v in values), default=0)
    return [f"{v:.{decimals}f}" for v in values]


def _round_y(ax) -> None:
    """Major y ticks at round values within the current limits (linear or log axis), no minor ones."""
    from matplotlib.ticker import NullLocator

    ticks = nice_ticks(*ax.get_ylim())
    ax.set_yticks(ticks, tick_labels(ticks))
    ax.yaxis.set_minor_locator(NullLocator())


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


# One color per variant in every plot; the variants compared most often get the distinct tab10 colors.
PALETTE_ORDER = ("swiglu", "one_moa", "bi_moa", "qd_moa", "relu2", "moa1", "one_la", "bi_la", "qd_la", "la1",
                 "gelu", "silu", "relu")
# The baselines stand apart from the variants: black, thicker, dashed; told from each other by dash and marker.
BASELINE_STYLE = {"swiglu": {"linestyle": "--", "marker": "s"}, "relu2": {"linestyle": "-.", "marker": "D"},
                  "gelu": {"linestyle": ":", "marker": "o"}}


def _color(variant: str):
    base = variant.split("[")[0]
    index = PALETTE_ORDER.index(base) if base in PALETTE_ORDER else len(PALETTE_ORDER)
    if variant != base:  # non-default keys: a shade of its own in the wider palette
        return _plt().get_cmap("tab20")((2 * index + 1) % 20)
    return f"C{index}" if index < 10 else _plt().get_cmap("tab20")((2 * index) % 20)


def line_style(result: VariantResult, marker: bool = True) -> dict:
    """matplotlib keyword arguments of a variant's line: a baseline is black, dashed and thicker."""
    if result.is_baseline:
        style = {"color": "black", "linewidth": 2.2, "zorder": 1.8,  # under the variants
                 **BASELINE_STYLE.get(result.ffn, {"linestyle": "--", "marker": "s"})}
    else:
        style = {"color": _color(result.variant), "linewidth": 1.5, "linestyle": "-", "marker": "o"}
    if not marker:
        style.pop("marker")
    return style


def legend_label(result: VariantResult, untuned: bool, lr: bool = False) -> str:
    """`swiglu (baseline, lr 1.6e-2)`; `untuned` adds that its LR was not tuned."""
    notes = (["baseline"] if result.is_baseline else []) + ([f"lr {format_lr(result.best_lr)}"] if lr else [])
    notes += ["LR not tuned"] if untuned else []
    return result.variant + (f" ({', '.join(notes)})" if notes else "")


def _untuned(tables: list[dict[str, VariantResult]]) -> tuple[set[str], bool]:
    """The variants run at one learning rate only (in any of the tables), and whether that is all of them."""
    variants = {v for table in tables for v in table}
    untuned = {v for table in tables for v, r in table.items() if not r.lr_tuned}
    return untuned, bool(variants) and untuned == variants


def _decorate(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, title, grid and legend: every plot must read without the table."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:  # runs without a curve (metrics.jsonl lost) draw nothing
        ax.legend(fontsize=8)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


class Figures:
    """A report's figures, named as they are planned and drawn together at the end, in forked shares side by side:
    matplotlib draws on one core, and `make study`'s 19 figures took it 9-12 s."""

    def __init__(self, out: Path):
        self.out = out
        self.planned: list[tuple[Path, Callable]] = []

    def plan(self, name: str, draw: Callable) -> Path:
        """The figure's path; draw() returns its matplotlib figure when draw_all runs."""
        self.planned.append((self.out / name, draw))
        return self.out / name

    def draw_all(self) -> None:
        shares = max(1, min(os.cpu_count() or 1, len(self.planned) // FIGURES_PER_PROCESS))

        def draw_share(share: int) -> str:
            for path, draw in self.planned[share::shares]:
                _save(draw(), path)
            return "ok"

        answers = in_forked_shares(shares, draw_share) if shares > 1 and hasattr(os, "fork") else [draw_share(0)]
        for share, answer in enumerate(answers):
            if answer is None:  # a copy that failed: its figures drawn again here, where the error shows
                draw_share(share)


def _title(head: str, all_untuned: bool, detail: str) -> str:
    """Two lines: what the plot shows (and that no LR was tuned, when none was), then how to read it."""
    return head + (f" ({UNTUNED})" if all_untuned else "") + f"\n({detail})"


def _slug(label: tuple, setting: str | None = None) -> str:
    """A file name for a label; a setting (JSON) adds its hash, for labels that several groups share."""
    name = "_".join(str(p) for p in label).replace(" ", "").replace("/", "-")
    return name + (f"_{hashlib.sha1(setting.encode()).hexdigest()[:6]}" if setting else "")


def curves_figure(title: str, table: dict[str, VariantResult]):
    """(figure, axes): validation loss against training tokens at each variant's best LR."""
    from matplotlib.ticker import FuncFormatter

    fig, ax = _plt().subplots(figsize=(7, 4.5))
    untuned, all_untuned = _untuned([table])
    for variant, result in table.items():
        curves = [r.curve for r in result.runs if r.curve]
        if not curves:
            continue
        tokens = [t for t, _ in curves[0]]
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
        line, = ax.plot(tokens[:n], mean, label=legend_label(result, variant in untuned and not all_untuned, lr=True),
                        **line_style(result, marker=False))
        for c in curves if len(curves) > 1 else []:
            ax.plot([t for t, _ in c], [v for _, v in c], color=line.get_color(), alpha=0.25, linewidth=0.8)
    ax.xaxis.set_major_formatter(FuncFormatter(format_count))
    finals = [r.mean for r in table.values()]
    if finals:  # the interesting part is the end: clip the first steps' high losses
        ax.set_ylim(min(finals) - 0.1 * (max(finals) - min(finals) + 0.1), max(finals) + 1.0)
    _round_y(ax)
    _decorate(ax, "training tokens", "validation loss",
              _title(f"{title}: validation loss at each variant's best LR", all_untuned,
                     "mean over seeds; faint: single seeds; y axis clipped to the final losses + 1"))
    return fig, ax


def lr_figure(title: str, table: dict[str, VariantResult]):
    """(figure, axes): terminal loss against learning rate, ticked at the rates run; x: diverged there."""
    from matplotlib.ticker import NullLocator

    fig, ax = _plt().subplots(figsize=(7, 4.5))
    untuned, all_untuned = _untuned([table])
    for variant, result in table.items():
        lrs = sorted(result.by_lr)
        means = [statistics.fmean(result.by_lr[lr]) for lr in lrs]
        low = [m - min(result.by_lr[lr]) for m, lr in zip(means, lrs)]
        high = [max(result.by_lr[lr]) - m for m, lr in zip(means, lrs)]
        style = line_style(result)
        ax.errorbar(lrs, means, yerr=[low, high], capsize=3,
                    label=legend_label(result, variant in untuned and not all_untuned), **style)
        if result.diverged:  # no loss to draw: a cross at the top, at the rate that diverged
            ax.plot(sorted(result.diverged), [0.97] * len(result.diverged), linestyle="none", marker="x",
                    color=style["color"], transform=ax.get_xaxis_transform(), clip_on=False)
    if any(r.diverged for r in table.values()):  # an empty errorbar: its legend entry follows the variants'
        ax.errorbar([], [], linestyle="none", marker="x", color="gray", label="diverged there (x at the top)")
    ax.set_xscale("log")
    grid = lr_grid(table)
    ax.set_xticks(grid, [format_lr(lr) for lr in grid])
    ax.xaxis.set_minor_locator(NullLocator())
    _round_y(ax)
    _decorate(ax, "peak learning rate (ticks: the rates run)", "terminal validation loss",
              _title(f"{title}: terminal loss against learning rate", all_untuned,
                     "mean over seeds; bars: min to max"))
    return fig, ax


def plot_curves(title: str, slug: str, table: dict[str, VariantResult], figures: Figures) -> Path:
    return figures.plan(f"curves_{slug}.png", lambda: curves_figure(title, table)[0])


def plot_lr(title: str, slug: str, table: dict[str, VariantResult], figures: Figures) -> Path:
    return figures.plan(f"lr_{slug}.png", lambda: lr_figure(title, table)[0])


def scaling_figure(setting: tuple, groups: list[tuple[tuple, dict[str, VariantResult]]]):
    """(figure, axes): terminal loss at the best LR against total parameters, over the groups' model sizes."""
    fig, ax = _plt().subplots(figsize=(7, 4.5))
    tables = [table for _, table in groups]
    untuned, all_untuned = _untuned(tables)
    variants = list(dict.fromkeys(v for table in tables for v in table))  # the tables' order
    for variant in variants:
        results = [t[variant] for t in tables if variant in t]
        points = sorted((r.params.get("total", 0), r.mean, r.std) for r in results)
        ax.errorbar([p for p, _, _ in points], [m for _, m, _ in points], yerr=[s for _, _, s in points], capsize=3,
                    label=legend_label(results[0], variant in untuned and not all_untuned),
                    **line_style(results[0]))
    ax.set_xscale("log")
    ax.set_yscale("log")
    # a narrow log range has no decade ticks: label the model sizes and round loss values instead
    ax.minorticks_off()
    sizes = sorted((statistics.median(r.params.get("total", 0) for r in t.values()), g[0]) for g, t in groups)
    ax.set_xticks([n for n, _ in sizes], [f"{model}\n{format_count(n)}" for n, model in sizes])
    _round_y(ax)
    _decorate(ax, "parameters (total)", "terminal validation loss (best LR)",
              _title(f"Terminal loss against model size ({', '.join(setting)})", all_untuned,
                     "mean over seeds; bars: std"))
    return fig, ax


def gates_figure(title: str, gates: dict):
    """(figure, heatmap axes): the mean gate of every layer and dictionary entry (a layer-by-entry heatmap),
    then one histogram per entry over the validation tokens, a line per layer (gates.json of gate_report.py)."""
    layers = list(gates["layers"])
    entries = gates["layers"][layers[0]]["entries"]
    cols = min(4, len(entries))
    rows = -(-len(entries) // cols)
    fig = _plt().figure(figsize=(3.2 * cols, 1.2 + 0.35 * len(layers) + 2.3 * rows))
    grid = fig.add_gridspec(1 + rows, cols, height_ratios=[0.9 + 0.3 * len(layers)] + [2.0] * rows)
    heat = fig.add_subplot(grid[0, :])
    means = [[gates["layers"][layer]["mean"][k] for k in range(len(entries))] for layer in layers]
    image = heat.imshow(means, aspect="auto", cmap="viridis")
    for i, row in enumerate(means):
        for k, value in enumerate(row):
            heat.text(k, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                      color="white" if value < (min(map(min, means)) + max(map(max, means))) / 2 else "black")
    heat.set_xticks(range(len(entries)), entries, fontsize=8)
    heat.set_yticks(range(len(layers)), layers, fontsize=8)
    heat.set_title(f"{title}\nmean gate per layer and activation (over {gates['tokens']:,} validation tokens)",
                   fontsize=9)
    fig.colorbar(image, ax=heat, fraction=0.03, pad=0.01)
    for k, entry in enumerate(entries):
        ax = fig.add_subplot(grid[1 + k // cols, k % cols])
        for layer in layers:
            histogram = gates["layers"][layer]["histogram"]
            edges, counts = histogram["edges"], histogram["counts"][k]
            total = sum(counts) or 1
            ax.plot([(a + b) / 2 for a, b in zip(edges, edges[1:])], [c / total for c in counts], label=layer,
                    linewidth=1.2)
        ax.set_title(f"gate of {entry}", fontsize=8)
        ax.tick_params(labelsize=7)
        if k % cols == 0:
            ax.set_ylabel("share of tokens", fontsize=8)
        if k == 0 and len(layers) > 1:
            ax.legend(fontsize=6)
    return fig, heat


def plot_gates(results: dict[tuple, dict[str, VariantResult]], names: dict,
               figures: Figures) -> dict[tuple, list[Path]]:
    """Per group, a gate figure for each MoA variant whose best-LR runs hold gates.json (the lowest seed's)."""
    from .gate_report import read_gates

    paths = defaultdict(list)
    for group, table in results.items():
        title_head = f"{group[0]}, {group[1]}"
        for variant, result in table.items():
            gates = next((g for run in sorted(result.runs, key=lambda r: r.seed)
                          if (g := read_gates(run.path)) and g.get("layers")), None)
            if gates is None:
                continue
            variant_slug = "".join(c if c.isalnum() or c in "_-" else "_" for c in variant)
            title = f"{title_head}: {variant} at lr {format_lr(result.best_lr)}"
            paths[group].append(figures.plan(f"gates_{names[group][1]}_{variant_slug}.png",
                                             lambda title=title, gates=gates: gates_figure(title, gates)[0]))
    return paths


def plot_scaling(results: dict[tuple, dict[str, VariantResult]], figures: Figures) -> list[Path]:
    """Terminal loss against total parameters, one plot per (budget, optimizer, schedule) with several sizes."""
    by_setting: dict[tuple, list[tuple[tuple, dict]]] = defaultdict(list)
    for group, table in results.items():
        others = {k: v for k, v in json.loads(group[4]).items() if not under(k, SIZE_KEYS)}
        by_setting[(*group[1:4], json.dumps(others, sort_keys=True))].append((group, table))
    paths = []
    for key, groups in by_setting.items():
        setting = key[:3]
        if len({g[0] for g, _ in groups}) < 2:
            continue
        shared = sum(other[:3] == key[:3] for other in by_setting) > 1
        slug = _slug(setting, key[3] if shared else None)
        paths.append(figures.plan(f"scaling_{slug}.png",
                                  lambda setting=setting, groups=groups: scaling_figure(setting, groups)[0]))
    return paths


# ----------------------------------------------------------------------------- the report


def _fmt_rel(result: VariantResult) -> str:
    if result.relative is None:
        return "-"
    if result.variant == result.baseline:
        return "baseline"
    return f"{100 * result.relative:+.2f}%"


def _lr_cell(result: VariantResult, lr: float) -> str:
    cells = []
    if lr in result.by_lr:
        cells.append(f"{statistics.fmean(result.by_lr[lr]):.4f}")
    if lr in result.diverged:
        cells.append(f"*diverged {result.diverged[lr]}*")
    return " ".join(cells) or "-"


def loss_at(result: VariantResult, lr: float) -> float | str | None:
    """Mean terminal loss at a learning rate of the grid (to 1% of it): a float, 'diverged', or None if not run."""
    for tried, losses in result.by_lr.items():
        if math.isclose(tried, lr, rel_tol=0.01):
            return statistics.fmean(losses)
    return "diverged" if any(math.isclose(t, lr, rel_tol=0.01) for t in result.diverged) else None


def lr_tolerance(result: VariantResult) -> dict[str, float | str | None]:
    """How much the loss rises at half and at twice the best learning rate, relative to the loss at it:
    {'half': 0.012, 'double': 'diverged', ...}; None where that rate was not run."""
    out = {}
    for name, factor in (("half", 0.5), ("double", 2.0)):
        loss = loss_at(result, result.best_lr * factor)
        out[name] = loss if loss is None or isinstance(loss, str) else (loss - result.mean) / result.mean
    return out


def _tolerance_cell(value) -> str:
    return "-" if value is None else value if isinstance(value, str) else f"{value:+.2%}"


def tolerance_lines(table: dict[str, VariantResult]) -> list[str]:
    """The learning-rate tolerance table of a group: each variant's best LR against its baseline's, and the
    loss at half and twice its best LR (relative to its loss at the best), beside the baseline's."""
    rows = []
    for variant, r in table.items():
        base = table.get(r.baseline)
        if base is None or r is base:
            continue
        mine, theirs = lr_tolerance(r), lr_tolerance(base)
        rows.append(f"| {variant} | {r.best_lr:g} | {r.best_lr / base.best_lr:.3g}x | {_tolerance_cell(mine['half'])} "
                    f"| {_tolerance_cell(mine['double'])} | {r.baseline} at {base.best_lr:g}: "
                    f"{_tolerance_cell(theirs['half'])} / {_tolerance_cell(theirs['double'])} |")
    if not rows:
        return []
    return ["", "Learning-rate tolerance: each variant's best LR against its baseline's, and how much its loss rises "
            "at half and at twice its best LR (relative to its loss there; *-*: that rate was not run), beside "
            "the same for the baseline:", "",
            "| variant | best LR | vs baseline's best | at ½× best | at 2× best | baseline: ½× / 2× |",
            "|---|---:|---:|---:|---:|---|", *rows]


PREFERRED_METRICS = ("acc_norm", "acc")  # per task, the first that lm-eval reported


def downstream_scores(table: dict[str, VariantResult]) -> tuple[list[tuple[str, str]], dict[str, dict]]:
    """([(task, metric)], {variant: {task: mean score over the best-LR seeds that hold eval.json}})."""
    scores: dict[str, dict[str, list[float]]] = {}
    metrics: dict[str, str] = {}
    for variant, result in table.items():
        for run in result.runs:
            try:
                rows = json.loads((run.path / "eval.json").read_text()).get("results", [])
            except (OSError, ValueError):
                continue
            by_task: dict[str, dict[str, float]] = defaultdict(dict)
            for row in rows:
                if row.get("num_fewshot", 0) == 0:  # the paper's table is zero-shot
                    by_task[row["task"]][row["metric"]] = row["value"]
            for task, values in by_task.items():
                metric = metrics.setdefault(task, next((m for m in PREFERRED_METRICS if m in values), min(values)))
                if metric in values:
                    scores.setdefault(variant, {}).setdefault(task, []).append(values[metric])
    order = sorted(metrics, key=lambda t: (t not in PAPER_TASKS, PAPER_TASKS.index(t) if t in PAPER_TASKS else 0, t))
    means = {v: {t: statistics.fmean(x) for t, x in tasks.items()} for v, tasks in scores.items()}
    return [(t, metrics[t]) for t in order], means


def downstream_lines(table: dict[str, VariantResult]) -> tuple[list[str], dict]:
    """The zero-shot table of a group, as the paper's: task by variant, and the average over tasks."""
    tasks, means = downstream_scores(table)
    if not means:
        return [], {}
    head = " | ".join(f"{task} ({metric})" for task, metric in tasks)
    lines = ["", "Zero-shot evaluation (moa-eval; the mean over the best-LR seeds that were evaluated; *average*: "
             "over the tasks every variant has):", "", f"| variant | {head} | average |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    shared = [t for t, _ in tasks if all(t in m for m in means.values())]
    averages = {v: statistics.fmean(m[t] for t in shared) if shared else None for v, m in means.items()}
    for variant, values in means.items():
        cells = [f"{100 * values[t]:.2f}" if t in values else "-" for t, _ in tasks]
        average = "-" if averages[variant] is None else f"{100 * averages[variant]:.2f}"
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {average} |")
    return lines, {v: {**m, "average": averages[v]} for v, m in means.items()}


def _best_lr_cell(result: VariantResult) -> str:
    """The best LR, marked ⚠ at the edge of the grid, or flagged untuned when the grid had one value."""
    flag = " ⚠" if result.lr_at_edge else "" if result.lr_tuned else f" ({UNTUNED})"
    return f"{result.best_lr:g}{flag}"


def _cell(text: str) -> str:
    """Text that keeps a Markdown table row whole."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _untuned_warning(table: dict[str, VariantResult]) -> list[str]:
    """Lines under a group's heading when its learning-rate "grid" was one value for every variant."""
    if not _untuned([table])[1]:
        return []
    lrs = ", ".join(f"{lr:g}" for lr in lr_grid(table))
    return [f"**{UNTUNED}**: every variant ran at one learning rate only ({lrs}); the losses are not at tuned "
            "rates, so their differences may come from the learning rate.", ""]


def write_report(runs: list[Run], out: Path, sources: list[Path]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    results = compare(runs)
    lines = ["# moa-train report", "",
             f"Runs read from {', '.join(f'`{s}`' for s in sources)}: {len(runs)} "
             f"({sum(r.status == 'completed' for r in runs)} completed).", "",
             "Per group (model, token budget, optimizer, schedule, and equal in every other setting but the "
             "FFN, the LR and the seed) each variant's learning rate is tuned: "
             "*best LR* has the lowest terminal validation loss averaged over seeds. *Relative* is "
             "`(L - L_base) / L_base` against the group's baseline (swiglu for Type-II variants, relu2 for "
             "Type-I, gelu for every variant of a vision model). *Beyond seeds* says whether the seed ranges "
             "of the variant and its baseline at their "
             "best LRs do not overlap (with one seed per point this cannot be judged). A best LR at the edge "
             "of the grid is marked ⚠: the grid may not contain the optimum. A variant run at one learning rate "
             f"only is marked *{UNTUNED}*: its loss is not at a tuned rate.", ""]
    report = {"groups": [], "problems": []}
    names = group_names(results)
    figures = Figures(out)
    gate_plots = plot_gates(results, names, figures)
    for group, table in results.items():
        model, budget, optim, schedule = group[:4]
        extra, slug = names[group]
        lines += [f"## {model}, {budget}, {optim}, {schedule}" + (f" ({extra})" if extra else ""), "",
                  *_untuned_warning(table),
                  "| variant | best LR | terminal loss | seeds | range | relative | beyond seeds | params | "
                  "ffn extra | tokens |", "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for variant, r in table.items():
            beyond = "-" if r.separated is None else ("yes" if r.separated else "no")
            lines.append(f"| {variant} | {_best_lr_cell(r)} | {r.mean:.4f} ± {r.std:.4f} | "
                         f"{len(r.losses)} | {min(r.losses):.4f}-{max(r.losses):.4f} | {_fmt_rel(r)} | {beyond} | "
                         f"{r.params.get('total', 0):,} | {r.params.get('ffn_extra', 0):,} | {r.tokens:,} |")
        lrs = sorted({lr for r in table.values() for lr in (*r.by_lr, *r.diverged)})
        lines += ["", "Terminal loss by learning rate (mean over seeds; *diverged k*: k seeds diverged there, "
                  "so that rate is not chosen):", "",
                  "| variant | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
        for variant, r in table.items():
            lines.append(f"| {variant} | " + " | ".join(_lr_cell(r, lr) for lr in lrs) + " |")
        lines += tolerance_lines(table)
        downstream, downstream_json = downstream_lines(table)
        lines += downstream
        title = f"{model}, {budget}" + (f" ({extra})" if extra else "")
        curves, lr_plot = plot_curves(title, slug, table, figures), plot_lr(title, slug, table, figures)
        lines += ["", f"![validation loss against tokens]({curves.name})", "", f"![terminal loss against LR]"
                  f"({lr_plot.name})", ""]
        if gate_plots.get(group):
            lines += ["What the gates learned, at each MoA variant's best LR (lowest seed; `moa-gates RUN_DIR` prints "
                      "the tables, with the tokens that drive each gate):", ""]
            lines += [f"![gates]({p.name})" for p in gate_plots[group]] + [""]
        report["groups"].append({"model": model, "budget": budget, "optim": optim, "schedule": schedule,
                                 "distinguished_by": extra,
                                 "variants": [{"variant": v, "ffn": r.ffn, "baseline": r.baseline,
                                               "best_lr": r.best_lr, "lr_at_edge": r.lr_at_edge,
                                               "lr_tuned": r.lr_tuned,
                                               "terminal_loss": r.mean, "std": r.std, "losses": r.losses,
                                               "relative": r.relative, "beyond_seeds": r.separated,
                                               "lr_tolerance": lr_tolerance(r),
                                               "best_lr_vs_baseline": (r.best_lr / table[r.baseline].best_lr
                                                                       if r.baseline in table else None),
                                               "by_lr": {str(k): v2 for k, v2 in r.by_lr.items()},
                                               "diverged_by_lr": {str(k): n for k, n in r.diverged.items()},
                                               "params": r.params, "tokens": r.tokens} for v, r in table.items()],
                                 "downstream": downstream_json,
                                 "plots": [curves.name, lr_plot.name, *(p.name for p in gate_plots.get(group, []))]})
    scaling = plot_scaling(results, figures)
    if scaling:
        lines += ["## Across model sizes", ""]
        lines += [f"![terminal loss against parameters]({p.name})" for p in scaling] + [""]
        report["scaling_plots"] = [p.name for p in scaling]
    problems = [r for r in runs if r.status != "completed"]
    lines += ["## Runs not in the comparison", ""]
    if problems:
        lines += ["| run | status | reason |", "|---|---|---|"]
        for r in problems:
            lines.append(f"| `{r.path}` | {r.status} | {_cell(r.reason)} |")
            report["problems"].append({"path": str(r.path), "status": r.status, "reason": r.reason})
    else:
        lines.append("None: every run completed.")
    figures.draw_all()
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moa-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path,
                        help="run directories or sweep directories (searched recursively; no default: required)")
    parser.add_argument("--out", type=Path, default=Path("report"),
                        help="where report.md, report.json and the plots go (created if missing)")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"moa-report: error: not a directory: {', '.join(missing)}", file=sys.stderr)
        sys.exit(2)
    runs = [read_run(d) for d in find_run_dirs(args.dirs)]
    if not runs:
        print(f"moa-report: error: no runs (summary.json, metrics.jsonl or .hydra/config.yaml) under "
              f"{', '.join(map(str, args.dirs))}", file=sys.stderr)
        sys.exit(2)
    report = write_report(runs, args.out, args.dirs)
    n_variants = sum(len(g["variants"]) for g in report["groups"])
    print(f"moa-report: {len(runs)} runs, {len(report['groups'])} group(s), {n_variants} variant result(s), "
          f"{len(report['problems'])} not completed -> {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
