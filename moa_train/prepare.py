"""`moa-prepare [OVERRIDES...]`: prepare a run's data alone and print a summary.

It composes the same Hydra config as `moa-train` (the same overrides, e.g. `data=local
data.path=DIR model=tiny`) and fills the same cache, so the training run that follows starts at
once. Exit status 2, with a one-paragraph message, for a bad config or unusable data.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from .errors import UserError


def prepare(overrides: list[str], log=print):
    """(config, PreparedData, seconds) for the run these overrides describe."""
    from .config import compose_run_config, validate_config
    from .data import prepare_data, resolve_vocab_size

    cfg = compose_run_config(overrides)
    validate_config(cfg)
    vocab_size = resolve_vocab_size(cfg.data, cfg.model.vocab_size)
    start = time.perf_counter()
    data = prepare_data(cfg.data, vocab_size, cfg.train.eval_tokens, cfg.train.seq_len, log=log)
    return cfg, data, time.perf_counter() - start


def format_summary(data, seconds: float) -> str:
    meta = data.meta
    tokenizer = meta["tokenizer"]
    kind = ("byte-level BPE trained on the corpus" if tokenizer["kind"] == "bpe"
            else f"{tokenizer['kind']} {tokenizer['name']}")
    where = meta.get("dataset") or meta.get("root") or " + ".join(meta.get("parts", []))
    files = f", {meta['file_count']} files" if "file_count" in meta else ""
    lines = [
        (f"prepared in {seconds:.1f}s" if data.built else f"already prepared (cache checked in {seconds:.2f}s; "
         f"preparing took {meta['prepare_seconds']:.1f}s)"),
        f"  source     {meta['source']}: {where}{files}",
        f"  documents  {meta['documents']:,} ({meta['val_documents']:,} held out whole for validation)",
        f"  tokens     {meta['train_tokens']:,} for training in {len(meta['shards'])} shard(s), "
        f"{meta['val_tokens']:,} for validation ({meta['dtype']})",
        f"  tokenizer  {kind}, {meta['vocab_size']:,} entries, end-of-document id {meta['eot_id']}, "
        f"sha256 {meta['tokenizer_sha256'][:16]}",
        f"  cache      {data.cache_dir}",
    ]
    if meta["replaced_characters"]:
        total = sum(meta["replaced_characters"].values())
        lines.append(f"  warning    {total} non-UTF-8 byte sequence(s) read as U+FFFD in "
                     f"{len(meta['replaced_characters'])} file(s) (see meta.json)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    parser = argparse.ArgumentParser(
        prog="moa-prepare", description="Tokenise a run's corpus into the data cache (the same overrides as "
        "moa-train) and print a summary.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=local data.path=DIR model=tiny "
                        "(default: none: the default run of conf/config.yaml)")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as one JSON object (default: off, a readable summary)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    log = logging.getLogger("moa_train.prepare").info
    try:
        _, data, seconds = prepare(args.overrides, log=log)
    except UserError as exc:
        print(f"moa-prepare: error: {exc}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as exc:  # unknown key or option in the overrides
        print(f"moa-prepare: error: {str(exc).strip()}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**data.summary(), "built": data.built, "seconds": round(seconds, 3)}))
    else:
        print(format_summary(data, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
