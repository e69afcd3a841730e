"""`moa-report DIR... [--out DIR]`: compare FFN variants the way the paper does.

Runs (single runs or Hydra multirun sweeps, found recursively by their summary.json, metrics.jsonl
or .hydra/config.yaml) are grouped by what must be equal for a fair comparison: model size, token
budget, optimizer, schedule, and every other setting that changes the numbers (data, sequence
length, batch, optimizer settings other than the LR...); groups of the same name are told apart by
the keys in which they differ. Within a group each variant's learning rate is tuned: the best LR
is the one whose terminal validation loss, averaged over seeds, is lowest. The report gives each
variant's terminal loss at its best LR, the spread over seeds, and the relative loss against the
group's baseline (swiglu for Type-II variants, relu2 for Type-I), `(L - L_base) / L_base`, and says
whether the difference is larger than the seeds' spread. Runs that failed, diverged or did not
finish are listed, never silently dropped.

Outputs in --out: report.md, report.json, and PNG plots (validation loss against tokens at the best
LR, terminal loss against LR, and terminal loss against parameters across model sizes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from .config import NOT_THE_RUN, flatten, under
from .ffn import FFN_REGISTRY
from .metrics import read_summary

# ffn keys that make two runs of the same ffn name different variants
VARIANT_KEYS = ("dict", "up_dict", "gate", "gate_bias", "gate_groups", "init")


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
        changed = [f"{k}={_short(self.config['ffn'].get(k))}" for k in VARIANT_KEYS
                   if k in defaults and k in self.config["ffn"] and self.config["ffn"][k] != defaults[k]]
        return self.ffn + (f"[{','.join(changed)}]" if changed else "")

    @property
    def label(self) -> tuple[str, str, str, str]:
        """The group's name: model, token budget, optimizer, schedule."""
        train, budget = self.config["train"], self.config["budget"]
        tokens = f"{train['max_steps']} steps" if train.get("max_steps") else \
            f"{_short(budget['tokens_per_param'])} tokens/param"
        return (self.config["model"]["name"], tokens, self.config["optim"]["name"], self.config["schedule"]["name"])

    @property
    def setting(self) -> dict[str, object]:
        """Every config key that must be equal for two runs to be compared (dotted keys)."""
        return {k: v for k, v in flatten(self.config).items() if not under(k, NOT_COMPARED)}

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
    if name not in _DEFAULTS:
        from importlib.resources import files

        path = files("moa_train.conf") / "ffn" / f"{name}.yaml"
        _DEFAULTS[name] = OmegaConf.to_container(OmegaConf.load(str(path))) if path.is_file() else {}
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


def read_run(path: Path) -> Run | None:
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
                variant, members[0].ffn, FFN_REGISTRY[members[0].ffn].baseline if members[0].ffn in FFN_REGISTRY
                else members[0].ffn, dict(by_lr), best_lr, by_lr[best_lr], best_runs,
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


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


# One color per variant in every plot; the variants compared most often get the distinct tab10 colors.
PALETTE_ORDER = ("swiglu", "one_moa", "bi_moa", "qd_moa", "relu2", "moa1", "one_la", "bi_la", "qd_la", "la1",
                 "gelu", "silu", "relu")


def _color(variant: str):
    base = variant.split("[")[0]
    index = PALETTE_ORDER.index(base) if base in PALETTE_ORDER else len(PALETTE_ORDER)
    if variant != base:  # non-default keys: a shade of its own in the wider palette
        return _plt().get_cmap("tab20")((2 * index + 1) % 20)
    return f"C{index}" if index < 10 else _plt().get_cmap("tab20")((2 * index) % 20)


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Labels, title, grid and legend (every plot must read without the table), then the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:  # runs without a curve (metrics.jsonl lost) draw nothing
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def _count(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k"


def _geomspace(low: float, high: float, n: int) -> list[float]:
    if high <= low:
        return [low]
    return [low * (high / low) ** (i / (n - 1)) for i in range(n)]


def _slug(label: tuple, setting: str | None = None) -> str:
    """A file name for a label; a setting (JSON) adds its hash, for labels that several groups share."""
    name = "_".join(str(p) for p in label).replace(" ", "").replace("/", "-")
    return name + (f"_{hashlib.sha1(setting.encode()).hexdigest()[:6]}" if setting else "")


def plot_curves(title: str, slug: str, table: dict[str, VariantResult], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, result in table.items():
        curves = [r.curve for r in result.runs if r.curve]
        if not curves:
            continue
        tokens = [t for t, _ in curves[0]]
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
        line, = ax.plot(tokens[:n], mean, label=f"{variant} (lr {result.best_lr:g})", color=_color(variant))
        for c in curves if len(curves) > 1 else []:
            ax.plot([t for t, _ in c], [v for _, v in c], color=line.get_color(), alpha=0.25, linewidth=0.8)
    finals = [r.mean for r in table.values()]
    if finals:  # the interesting part is the end: clip the first steps' high losses
        ax.set_ylim(min(finals) - 0.1 * (max(finals) - min(finals) + 0.1), max(finals) + 1.0)
    return _save(fig, ax, out / f"curves_{slug}.png", "training tokens", "validation loss",
                 f"{title}: validation loss at each variant's best LR\n"
                 f"(mean over seeds; faint: single seeds; y axis clipped to the final losses + 1)")


def plot_lr(title: str, slug: str, table: dict[str, VariantResult], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, result in table.items():
        lrs = sorted(result.by_lr)
        means = [statistics.fmean(result.by_lr[lr]) for lr in lrs]
        low = [m - min(result.by_lr[lr]) for m, lr in zip(means, lrs)]
        high = [max(result.by_lr[lr]) - m for m, lr in zip(means, lrs)]
        ax.errorbar(lrs, means, yerr=[low, high], marker="o", capsize=3, label=variant, color=_color(variant))
    ax.set_xscale("log")
    return _save(fig, ax, out / f"lr_{slug}.png", "peak learning rate", "terminal validation loss",
                 f"{title}: terminal loss against learning rate\n(mean over seeds; bars: min to max)")


def plot_scaling(results: dict[tuple, dict[str, VariantResult]], out: Path) -> list[Path]:
    """Terminal loss against total parameters, one plot per (budget, optimizer, schedule) with several sizes."""
    by_setting: dict[tuple, list[tuple[tuple, dict]]] = defaultdict(list)
    for group, table in results.items():
        others = {k: v for k, v in json.loads(group[4]).items() if not under(k, SIZE_KEYS)}
        by_setting[(*group[1:4], json.dumps(others, sort_keys=True))].append((group, table))
    paths = []
    plt = _plt()
    for key, groups in by_setting.items():
        setting = key[:3]
        if len({g[0] for g, _ in groups}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        variants = list(dict.fromkeys(v for _, table in groups for v in table))  # the tables' order
        losses = []
        for variant in variants:
            points = sorted((t[variant].params.get("total", 0), t[variant].mean, t[variant].std)
                            for _, t in groups if variant in t)
            ax.errorbar([p for p, _, _ in points], [m for _, m, _ in points], yerr=[s for _, _, s in points],
                        marker="o", capsize=3, label=variant, color=_color(variant))
            losses += [m for _, m, _ in points]
        ax.set_xscale("log")
        ax.set_yscale("log")
        # a narrow log range has no decade ticks: label the model sizes and a few loss values instead
        ax.minorticks_off()
        sizes = sorted((statistics.median(r.params.get("total", 0) for r in t.values()), g[0]) for g, t in groups)
        ax.set_xticks([n for n, _ in sizes], [f"{model}\n{_count(n)}" for n, model in sizes])
        y_ticks = [round(v, 3) for v in _geomspace(min(losses), max(losses), 5)]
        ax.set_yticks(y_ticks, [f"{v:g}" for v in y_ticks])
        shared = sum(other[:3] == key[:3] for other in by_setting) > 1
        slug = _slug(setting, key[3] if shared else None)
        paths.append(_save(fig, ax, out / f"scaling_{slug}.png", "parameters (total)",
                           "terminal validation loss (best LR)",
                           f"Terminal loss against model size ({', '.join(setting)})\n(mean over seeds; bars: std)"))
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


def _cell(text: str) -> str:
    """Text that keeps a Markdown table row whole."""
    return " ".join(str(text).split()).replace("|", "\\|")


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
             "Type-I). *Beyond seeds* says whether the seed ranges of the variant and its baseline at their "
             "best LRs do not overlap (with one seed per point this cannot be judged). A best LR at the edge "
             "of the grid is marked ⚠: the grid may not contain the optimum.", ""]
    report = {"groups": [], "problems": []}
    names = group_names(results)
    for group, table in results.items():
        model, budget, optim, schedule = group[:4]
        extra, slug = names[group]
        lines += [f"## {model}, {budget}, {optim}, {schedule}" + (f" ({extra})" if extra else ""), "",
                  "| variant | best LR | terminal loss | seeds | range | relative | beyond seeds | params | "
                  "ffn extra | tokens |", "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for variant, r in table.items():
            beyond = "-" if r.separated is None else ("yes" if r.separated else "no")
            lines.append(f"| {variant} | {r.best_lr:g}{' ⚠' if r.lr_at_edge else ''} | {r.mean:.4f} ± {r.std:.4f} | "
                         f"{len(r.losses)} | {min(r.losses):.4f}-{max(r.losses):.4f} | {_fmt_rel(r)} | {beyond} | "
                         f"{r.params.get('total', 0):,} | {r.params.get('ffn_extra', 0):,} | {r.tokens:,} |")
        lrs = sorted({lr for r in table.values() for lr in (*r.by_lr, *r.diverged)})
        lines += ["", "Terminal loss by learning rate (mean over seeds; *diverged k*: k seeds diverged there, "
                  "so that rate is not chosen):", "",
                  "| variant | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
        for variant, r in table.items():
            lines.append(f"| {variant} | " + " | ".join(_lr_cell(r, lr) for lr in lrs) + " |")
        title = f"{model}, {budget}" + (f" ({extra})" if extra else "")
        curves, lr_plot = plot_curves(title, slug, table, out), plot_lr(title, slug, table, out)
        lines += ["", f"![validation loss against tokens]({curves.name})", "", f"![terminal loss against LR]"
                  f"({lr_plot.name})", ""]
        report["groups"].append({"model": model, "budget": budget, "optim": optim, "schedule": schedule,
                                 "distinguished_by": extra,
                                 "variants": [{"variant": v, "ffn": r.ffn, "baseline": r.baseline,
                                               "best_lr": r.best_lr, "lr_at_edge": r.lr_at_edge,
                                               "terminal_loss": r.mean, "std": r.std, "losses": r.losses,
                                               "relative": r.relative, "beyond_seeds": r.separated,
                                               "by_lr": {str(k): v2 for k, v2 in r.by_lr.items()},
                                               "diverged_by_lr": {str(k): n for k, n in r.diverged.items()},
                                               "params": r.params, "tokens": r.tokens} for v, r in table.items()],
                                 "plots": [curves.name, lr_plot.name]})
    scaling = plot_scaling(results, out)
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
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moa-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path,
                        help="run directories or sweep directories (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where report.md and the plots go")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"moa-report: error: not a directory: {', '.join(missing)}", file=sys.stderr)
        sys.exit(2)
    runs = [r for r in (read_run(d) for d in find_run_dirs(args.dirs)) if r is not None]
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
