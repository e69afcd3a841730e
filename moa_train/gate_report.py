"""`moa-gates RUN_DIR`: what the MoA gates of one trained run learned.

For every MoA layer: the distribution of each gate over the validation tokens (mean, spread,
quantiles, a histogram), and which tokens of the vocabulary drive each activation: the tokens with
the highest and the lowest mean gate (over their occurrences in the validation set, at least
`MIN_COUNT` of them). Training writes the same analysis to `gates.json` at the end of an MoA run;
`moa-gates` prints it, computing it first from the run's newest checkpoint when the file is absent
(or with --recompute). Routed MoE experts get distributions only: their rows are sorted by expert,
not by token.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from .errors import UserError
from .ffn import GateRecorder

GATES_FILE = "gates.json"
MIN_COUNT = 5  # occurrences a token needs to be ranked
TOP = 10  # tokens listed per gate and direction


def gate_summary(recorders: dict[str, GateRecorder], entry_names: dict[str, list[str]], decode,
                 step: int | None = None, top: int = TOP) -> dict:
    """The gates.json record of a detailed recording (evaluation.evaluate with a GateDetail).

    `decode(id) -> str` names a token. Layers without a distribution (LA, or nothing recorded) are left out.
    """
    layers = {}
    for layer, r in recorders.items():
        if r.detail is None or not r.count:
            continue
        names = entry_names[layer]
        mean = r.sum / r.count
        std = (r.sum_sq / r.count - mean ** 2).clamp_min(0).sqrt()
        edges = torch.linspace(r.low, r.high, r.histogram.shape[1] + 1, dtype=torch.float64)
        record = {"entries": names, "mean": _round(mean), "std": _round(std),
                  "quantiles": {f"p{int(q * 100):02d}": _round(histogram_quantile(r.histogram, edges, q))
                                for q in (0.05, 0.5, 0.95)},
                  "histogram": {"edges": _round(edges), "counts": r.histogram.long().tolist()}}
        seen = r.token_count >= MIN_COUNT
        if seen.any():
            ids = seen.nonzero().flatten()
            token_mean = r.token_sum[ids] / r.token_count[ids, None]  # (tokens, n)
            record["tokens"] = {name: ranked_tokens(ids, token_mean[:, k], r.token_count[ids], decode, top)
                                for k, name in enumerate(names)}
            record["tokens_ranked"] = int(seen.sum())
        layers[layer] = record
    return {"step": step, "tokens": max((r.count for r in recorders.values()), default=0), "min_count": MIN_COUNT,
            "layers": layers}


def ranked_tokens(ids: torch.Tensor, means: torch.Tensor, counts: torch.Tensor, decode, top: int) -> dict:
    """{'most': [[text, mean gate, occurrences], ...], 'least': [...]}: the `top` tokens at either end."""
    order = means.argsort(descending=True).tolist()

    def rows(picked: list[int]) -> list[list]:
        return [[decode(int(ids[i])), round(float(means[i]), 4), int(counts[i])] for i in picked]

    return {"most": rows(order[:top]), "least": rows(order[::-1][:top])}


def histogram_quantile(histogram: torch.Tensor, edges: torch.Tensor, q: float) -> torch.Tensor:
    """Per row of a (n, bins) histogram, the value below which a share q of the mass lies (linear within a bin)."""
    cumulative = histogram.cumsum(1)
    total = cumulative[:, -1:].clamp_min(1)
    target = q * total
    index = torch.searchsorted(cumulative, target).clamp(max=histogram.shape[1] - 1)  # (n, 1)
    below = torch.where(index > 0, cumulative.gather(1, (index - 1).clamp_min(0)), torch.zeros_like(target))
    inside = histogram.gather(1, index).clamp_min(1e-12)
    fraction = ((target - below) / inside).clamp(0, 1)
    width = edges[1] - edges[0]
    return (edges[index.flatten()] + fraction.flatten() * width).flatten()


def _round(t: torch.Tensor) -> list[float]:
    return [round(float(v), 5) for v in t.flatten()]


def read_gates(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / GATES_FILE).read_text())
    except (OSError, ValueError):
        return None


def format_tables(gates: dict, top: int = TOP) -> str:
    """The analysis as plain-text tables: per layer, the gates' distributions, then their tokens."""
    lines = [f"gates over {gates['tokens']:,} validation tokens" +
             (f" at step {gates['step']}" if gates.get("step") is not None else "")]
    for layer, record in gates["layers"].items():
        lines += ["", f"{layer}", f"  {'gate':<12} {'mean':>8} {'std':>8} {'p05':>8} {'p50':>8} {'p95':>8}"]
        q = record["quantiles"]
        for k, name in enumerate(record["entries"]):
            lines.append(f"  {name:<12} {record['mean'][k]:>8.4f} {record['std'][k]:>8.4f} {q['p05'][k]:>8.4f} "
                         f"{q['p50'][k]:>8.4f} {q['p95'][k]:>8.4f}")
        for name, ranked in record.get("tokens", {}).items():
            most = ", ".join(f"{json.dumps(t)} {m:.3f}" for t, m, _ in ranked["most"][:top])
            least = ", ".join(f"{json.dumps(t)} {m:.3f}" for t, m, _ in ranked["least"][:top])
            lines += [f"  {name}: most gated by  {most}", f"  {' ' * len(name)}  least gated by {least}"]
    if not gates["layers"]:
        lines.append("no MoA layer: this model's FFN has no token-dependent gates")
    return "\n".join(lines)


def analyse_run(path: Path) -> dict:
    """Compute the analysis from a run's newest checkpoint (or the checkpoint `path`), on its validation set."""
    from .data import prepare_data, validation_batches
    from .distributed import DistEnv
    from .evaluation import evaluate
    from .ffn import GateDetail, gate_entry_names
    from .trained import load_trained

    trained = load_trained(path)
    cfg = trained.config
    data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.eval_tokens, cfg.train.seq_len, log=lambda *_: None)
    batches = validation_batches(data.val, cfg.train.seq_len, cfg.train.eval_tokens, 16, 0, 1)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mode="none")
    _, recorders = evaluate(trained.model, batches, env, contextlib.nullcontext(),
                            GateDetail(vocab_size=cfg.model.vocab_size))
    tokenizer = trained.tokenizer()
    return gate_summary(recorders, gate_entry_names(trained.model), lambda i: tokenizer.decode([i]), trained.step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moa-gates", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run", type=Path, help="a run directory (or one of its checkpoints/step-N); required")
    parser.add_argument("--recompute", action="store_true",
                        help="compute from the newest checkpoint even if the run holds gates.json")
    parser.add_argument("--top", type=int, default=TOP, help="tokens listed per gate and direction")
    parser.add_argument("--json", action="store_true", help="print the analysis as JSON instead of tables")
    args = parser.parse_args(argv)
    run_dir = args.run if (args.run / "summary.json").exists() or not (args.run / "meta.json").exists() \
        else args.run.parent.parent
    try:
        if not args.run.is_dir():
            raise UserError(f"'{args.run}' is not a directory: give a run directory or a checkpoint step-N directory.")
        gates = None if args.recompute or args.run != run_dir else read_gates(run_dir)
        if gates is None:
            gates = analyse_run(args.run)
            if args.run == run_dir:
                (run_dir / GATES_FILE).write_text(json.dumps(gates, indent=1))
    except UserError as exc:
        print(f"moa-gates: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(gates, indent=1) if args.json else format_tables(gates, args.top))


if __name__ == "__main__":
    main()

