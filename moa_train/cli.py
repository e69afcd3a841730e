"""`moa-train` and `python -m moa_train`: the Hydra entry point."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import register_configs
from .errors import RunFailed, UserError
from .metrics import read_summary, write_summary
from .run_lock import LOCK_FILE, RunLock, RunLocked
from .utils import in_forked_shares, launched_ranks

# A sweep's failed jobs, one run directory a line, in its sweep directory: the jobs may run in other
# processes (the joblib launcher), so they append to a file that the sweep's own process reads at the end.
FAILED_RUNS_FILE = ".failed-runs"
PARALLEL_LAUNCHERS = ("JoblibLauncher",)  # local sweeps whose jobs share this machine's cores
SWEEP_DIR: list[Path] = []  # set by SweepOutcome in the process that runs the sweep


@hydra.main(version_base="1.3", config_path="pkg://moa_train.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    rank, world_size, _ = launched_ranks()
    # A sweep run in this process (the basic launcher, one rank) records a failed run and goes on;
    # elsewhere a failure must end the process non-zero: the launcher (submitit) reports it, and
    # torchrun tears down the other ranks instead of leaving them waiting at a collective.
    launcher = hydra_cfg.launcher._target_.rsplit(".", 1)[-1]
    goes_on = in_sweep and world_size == 1 and launcher in ("BasicLauncher", *PARALLEL_LAUNCHERS)
    if launcher in PARALLEL_LAUNCHERS and cfg.train.threads is None:
        # Jobs side by side on the cores: each takes its share of threads instead of all of them (two torch
        # processes with all cores each slow each other down by an order of magnitude).
        cfg.train.threads = max(1, (os.cpu_count() or 1) // _parallel_jobs(hydra_cfg.launcher.get("n_jobs")))
    fresh = _only_hydra_records(run_dir)
    # One writer per run directory: rank 0 holds its lock for the whole run, taken before anything heavy is
    # imported so that a second process stops within seconds (torchrun then ends that job's other ranks).
    lock = RunLock(run_dir) if rank == 0 and not cfg.dry_run else None
    try:
        if lock:
            lock.acquire()
        from .train import run  # imported here so that `--help`, config errors and a locked directory stay fast

        summary = run(cfg, run_dir)
        if cfg.dry_run and fresh and rank == 0:
            _remove_hydra_records(run_dir)  # a dry run trains nothing and leaves no run directory
    except RunFailed as exc:  # summary.json already says how it ended
        if in_sweep:
            _note_failed_run(run_dir)
        print(f"moa-train: {exc}", file=sys.stderr)
        if not goes_on:
            sys.exit(1)
        return None
    except Exception as exc:
        if isinstance(exc, RunLocked):  # the directory is another process's: touch nothing in it
            if in_sweep:
                _note_failed_run(run_dir)
        elif isinstance(exc, UserError) and fresh and rank == 0 and not in_sweep:
            _remove_hydra_records(run_dir)  # refused before training: leave no directory behind
        elif in_sweep:
            _record_failure(run_dir, cfg, exc)
        if isinstance(exc, UserError):
            where = f" (rank {rank})" if world_size > 1 else ""
            print(f"moa-train: error{where}: {exc}", file=sys.stderr)
            if not goes_on:
                sys.exit(2)
        elif goes_on:
            logging.getLogger("moa_train").exception("run %s failed; the sweep goes on", run_dir)
        else:
            raise
        return None
    finally:
        if lock:
            lock.release()
    return summary.get("val_loss")  # the objective Hydra sweepers minimise


HYDRA_RECORDS = {".hydra", "train.log", LOCK_FILE}  # what a run directory holds before a run writes anything


def _only_hydra_records(run_dir: Path) -> bool:
    """Whether the run directory holds nothing but what Hydra just wrote (it creates the directory
    before calling the task): then no earlier run of this name exists."""
    return run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= HYDRA_RECORDS


def _remove_hydra_records(run_dir: Path) -> None:
    for handler in logging.getLogger().handlers[:]:  # train.log's handler holds the file open
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir:
            handler.close()
            logging.getLogger().removeHandler(handler)
    shutil.rmtree(run_dir, ignore_errors=True)


def _record_failure(run_dir: Path, cfg: DictConfig, exc: Exception) -> None:
    """summary.json with status failed (moa-report lists it), unless the run had already completed."""
    _note_failed_run(run_dir)
    if launched_ranks()[0] != 0 or (read_summary(run_dir) or {}).get("status") == "completed":
        return
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an invalid config is what failed: keep it unresolved
        config = OmegaConf.to_container(cfg, resolve=False)
    write_summary(run_dir, {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "val_loss": None,
                            "config": config})


def _parallel_jobs(n_jobs) -> int:
    """How many jobs joblib runs at once for its n_jobs (None: 1; -1: one per core; -2: all cores but one)."""
    cores = os.cpu_count() or 1
    if not n_jobs:
        return 1
    return max(1, n_jobs if n_jobs > 0 else cores + 1 + n_jobs)


def _note_failed_run(run_dir: Path) -> None:
    if not HydraConfig.initialized():  # called outside a Hydra job: no sweep to tell
        return
    try:
        with open(Path(HydraConfig.get().sweep.dir) / FAILED_RUNS_FILE, "a") as f:  # one short line: atomic
            f.write(f"{run_dir}\n")
    except OSError:
        pass


def failed_sweep_runs() -> list[str]:
    """The run directories of this process's sweep whose job failed (read at the end of the sweep)."""
    if not SWEEP_DIR:
        return []
    try:
        return [line for line in (SWEEP_DIR[0] / FAILED_RUNS_FILE).read_text().splitlines() if line]
    except OSError:
        return []


class SweepOutcome(Callback):
    """Starts a sweep's record of failed jobs afresh (a rerun retries them) and remembers where it is."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(os.path.abspath(config.hydra.sweep.dir))
        SWEEP_DIR[:] = [sweep_dir]
        (sweep_dir / FAILED_RUNS_FILE).unlink(missing_ok=True)


class WritableOutputDir(Callback):
    """Refuses, before Hydra creates it, a run (or sweep) directory that cannot be created or written, with the
    key and the reason, instead of Hydra's traceback (conf/config.yaml: hydra.callbacks)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _check_writable("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check_writable("hydra.sweep.dir", config.hydra.sweep.dir)


def _check_writable(key: str, directory: str) -> None:
    path = Path(os.path.abspath(os.path.expanduser(directory)))
    existing = path
    while not existing.exists():  # the nearest ancestor that exists: where the directory would be created
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"'{existing}' is a file")
        # A probe, not os.access: root passes os.access on read-only and virtual file systems.
        probe = tempfile.mkdtemp(prefix=".moa-probe-", dir=existing)
        os.rmdir(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"moa-train: error: config key '{key}': cannot create or write '{path}' ({reason} in '{existing}'). "
              f"Choose a directory you can write, e.g. {key}=outputs/my-run.", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def one_config_repository():
    """For --help: Hydra lists the options of each of its ~100 config groups (its own and its plugins')
    through a fresh deep copy of the whole config repository each (about 40 ms apiece, 4 s in all); with
    no overrides every copy is the same, so one serves them all (2 s -> under 1 s on 2 cores)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    create = getattr(ConfigLoaderImpl, "_parse_overrides_and_create_caching_repo", None)
    if create is None:  # another Hydra: its own, slower listing
        yield
        return
    shared = {}

    def create_once(self, config_name, overrides):
        key = (config_name, tuple(overrides))
        if key not in shared:
            shared[key] = create(self, config_name, overrides)
        return shared[key]

    ConfigLoaderImpl._parse_overrides_and_create_caching_repo = create_once
    try:
        yield
    finally:
        ConfigLoaderImpl._parse_overrides_and_create_caching_repo = create


SWEEP_CONFIGS_PER_PROCESS = 16  # fewer to check: not worth a process (a composition takes about 0.1 s)


def validate_sweeps_in_parallel() -> None:
    """Hydra composes every job's config before a sweep's first job starts (Sweeper.validate_batch_is_legal), one
    after another: 13-15 s for `make study`'s 144 on one core while the others wait. Forked processes share the
    compositions here; the error raised is Hydra's own for the first bad config in the sweep's order, as
    checking them one by one would raise."""
    from hydra.plugins.sweeper import Sweeper

    check = Sweeper.validate_batch_is_legal
    if getattr(check, "in_parallel", False) or not hasattr(os, "fork"):  # fork: POSIX only
        return

    def first_failure(sweeper, batch, indices) -> int | None:
        for i in indices:
            try:
                check(sweeper, [batch[i]])
            except Exception:
                return i
        return None

    def validate(sweeper, batch) -> None:
        shares = min(os.cpu_count() or 1, len(batch) // SWEEP_CONFIGS_PER_PROCESS)
        if shares < 2:
            return check(sweeper, batch)

        def share_failure(share: int) -> str:  # the share's first config that fails to compose ("ok": none)
            failed = first_failure(sweeper, batch, range(share, len(batch), shares))
            return "ok" if failed is None else str(failed)

        answers = in_forked_shares(shares, share_failure)
        if None in answers:  # a copy that could not answer: all checked again here, one by one
            return check(sweeper, batch)
        if failed := [int(answer) for answer in answers if answer != "ok"]:
            check(sweeper, [batch[min(failed)]])  # raises Hydra's own error for that config

    validate.in_parallel = True
    Sweeper.validate_batch_is_legal = validate


def main() -> None:
    register_configs()
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        with one_config_repository():
            hydra_main()
        return
    rank, world_size, _ = launched_ranks()
    validate_sweeps_in_parallel()
    # Under torchrun every rank resolves the same run directory, but only rank 0 writes Hydra's
    # .hydra/ record and train.log; the others log warnings to stderr.
    if rank != 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=worker"]
    if world_size == 1:
        hydra_main()
        if failed := failed_sweep_runs():
            print(f"moa-train: {len(failed)} run(s) of the sweep failed: {', '.join(failed)}", file=sys.stderr)
            sys.exit(2)
        return
    # gloo's threads can outlive destroy_process_group and abort the interpreter's teardown now and
    # then (torch 2.13: "terminate called without an active exception"), turning a finished run
    # into a failed one: distributed ranks flush and leave without that teardown.
    code = 0
    try:
        hydra_main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
