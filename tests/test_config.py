"""Config composition and the bad-input contract: clear errors naming the key, no traceback."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import compose_config, group_options, run_cli
from moa_train.config import validate_config
from moa_train.errors import ConfigError, UserError

GROUPS = ("model", "ffn", "optim", "schedule", "data", "budget", "dist", "logger")


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), f"conf/{group}/ has no YAML options"


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_validates(group, tmp_path):
    (tmp_path / "a.txt").write_text("some text\n")
    for option in group_options(group):
        extra = [f"data.path={tmp_path}"] if (group, option) == ("data", "local") else []
        if option == "images":  # images and budgets in images are for the vision models
            extra = ["model=mae_tiny"]
        cfg = compose_config(*extra, f"{group}={option}")
        validate_config(cfg)
        if "source" in cfg[group]:  # data: the option picks the source; data.name names the corpus
            assert cfg[group].source == option
        elif "name" in cfg[group]:  # a parameter-matched preset names the baseline it widens
            assert cfg[group].name == option or option == f"{cfg[group].name}_match_{cfg[group].match_params_of}"


@pytest.mark.parametrize("model", group_options("model"))
@pytest.mark.parametrize("ffn", group_options("ffn"))
def test_every_model_with_every_ffn_composes(model, ffn):
    cfg = compose_config(f"model={model}", f"ffn={ffn}")
    validate_config(cfg)
    assert cfg.model.name == model
    assert cfg.ffn.name == ffn or ffn == f"{cfg.ffn.name}_match_{cfg.ffn.match_params_of}"  # a matched preset
    assert isinstance(cfg.model.dim, int) and cfg.model.dim > 0


def test_model_preset_sets_training_shape_but_command_line_wins():
    cfg = compose_config("model=dense_0.12b")
    assert (cfg.train.seq_len, cfg.train.batch_size) == (2048, 256)
    cfg = compose_config("model=dense_0.12b", "train.batch_size=32")
    assert cfg.train.batch_size == 32
    assert compose_config("model=tiny").train.seq_len == 256


def test_budget_presets():
    assert compose_config("budget=tpp20").budget.tokens_per_param == 20
    assert compose_config("budget=tpp100").budget.tokens_per_param == 100


@pytest.mark.parametrize("override", ["train.no_such_key=1", "optim.lr=abc", "model.dim=1.5",
                                      "model=no_such_model"])
def test_composition_rejects_unknown_keys_types_and_options(override):
    with pytest.raises(ConfigCompositionException):
        compose_config(override)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["optim.lr=-0.001"], "optim.lr"),
        (["optim.lr=0"], "optim.lr"),
        (["optim.weight_decay=-1"], "optim.weight_decay"),
        (["optim.beta2=1.0"], "optim.beta2"),
        (["budget.tokens_per_param=0"], "budget.tokens_per_param"),
        (["budget.tokens_per_param=-20"], "budget.tokens_per_param"),
        (["budget.count=everything"], "budget.count"),
        (["schedule.name=linear"], "schedule.name"),
        (["schedule=wsd", "schedule.decay_shape=cubic"], "schedule.decay_shape"),
        (["schedule.warmup_frac=1.5"], "schedule.warmup_frac"),
        (["model.n_heads=3"], "model.n_heads"),
        (["train.batch_size=0"], "train.batch_size"),
        (["train.seq_len=-5"], "train.seq_len"),
        (["train.device=tpu"], "train.device"),
        (["train.dtype=float16"], "train.dtype"),
        (["train.eval_tokens=10"], "train.eval_tokens"),
        (["ffn.name=nope"], "ffn.name"),
        (["data.tokenizer.vocab_size=100000"], "data.tokenizer.vocab_size"),
        (["data=local", "data.path=/no/such/dir"], "data.path"),
        (["data=local"], "data.path"),
        (["logger=wandb", "logger.mode=sometimes"], "logger.mode"),
    ],
)
def test_validation_names_the_key(overrides, key):
    cfg = compose_config(*overrides)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert info.value.key == key
    assert key in str(info.value)


def test_choice_errors_list_accepted_values():
    cfg = compose_config("schedule.name=linear")
    with pytest.raises(ConfigError, match="Accepted: cosine, wsd"):
        validate_config(cfg)


def test_resolved_config_is_plain_and_complete():
    cfg = compose_config()
    container = OmegaConf.to_container(cfg, resolve=True)
    assert set(container) >= set(GROUPS) | {"train", "dry_run"}


# --- the same contract through the real command line


def _assert_clean_failure(result, *needles):
    assert result.returncode != 0, result.stdout
    message = result.stderr + result.stdout
    assert "Traceback" not in message, message
    for needle in needles:
        assert needle in message, message


def test_cli_unknown_model_lists_available_models():
    result = run_cli("model=no_such_model")
    _assert_clean_failure(result, "no_such_model", "dense_0.12b", "dense_0.5b", "tiny")


def test_cli_negative_lr():
    result = run_cli("optim.lr=-1e-3", "dry_run=true")
    _assert_clean_failure(result, "optim.lr", "> 0")
    assert result.returncode == 2


def test_cli_wrong_type_and_unknown_key():
    _assert_clean_failure(run_cli("optim.lr=fast"), "optim.lr")
    _assert_clean_failure(run_cli("train.no_such_key=1"), "no_such_key")


def test_cli_missing_data_path(tmp_path):
    missing = tmp_path / "nothing_here"
    result = run_cli("data=local", f"data.path={missing}", f"hydra.run.dir={tmp_path / 'run'}")
    _assert_clean_failure(result, "data.path", str(missing))


def test_cli_zero_budget():
    _assert_clean_failure(run_cli("budget.tokens_per_param=0", "dry_run=true"), "budget.tokens_per_param")


def test_user_errors_are_one_class():
    assert issubclass(ConfigError, UserError)


def test_slurm_launcher_config_composes_for_sweeps():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="moa_train.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (8, 8, "gpu")


def test_run_directory_is_named_by_the_overrides():
    from moa_train.config import run_name

    assert run_name([]) == "default"
    assert run_name(["model=tiny", "ffn=qd_moa"]) == "ffn=qd_moa,model=tiny"  # sorted, as Hydra's override_dirname
    assert "/" not in run_name(["data.path=/corpus/books", "model=tiny"])
    assert run_name(["ffn.dict=[r2,g]"]) == "ffn.dict=[r2,g]"
    long = run_name(["x=" + "a" * 400])
    assert len(long) < 160 and long != run_name(["x=" + "a" * 399 + "b"])


def test_keys_that_do_not_change_a_run_leave_its_name_alone():
    """One list (config.NOT_THE_RUN) decides both what a finished run ignores and the run's name."""
    from moa_train.config import NOT_THE_RUN, run_name

    assert "train.log_every" in NOT_THE_RUN and "logger" in NOT_THE_RUN
    plain = run_name(["model=tiny", "train.max_steps=5"])
    for extra in ("train.log_every=10", "logger=wandb", "logger.mode=online", "train.progress=false",
                  "dry_run=true", "dist=ddp", "data.cache_dir=/tmp/c", "+train.resume=never", "sweep=cpu_study",
                  "hydra.verbose=true"):
        assert run_name(["model=tiny", extra, "train.max_steps=5"]) == plain, extra
    assert run_name(["model=tiny", "train.max_steps=5", "train.seed=1"]) != plain  # a seed is another run


def test_cli_same_command_same_run_directory(tmp_path):
    """Without hydra.run.dir, the run directory follows the overrides (so a rerun resumes); a rerun with
    another logging cadence is the same run: it is found complete and skipped."""
    runs_dir = tmp_path / "outputs" / "runs"
    first = run_cli("model=tiny", "train.max_steps=5", "train.log_every=10", "train.eval_every=5",
                    "train.progress=false", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_cli("model=tiny", "train.max_steps=5", "train.log_every=2", "train.eval_every=5",
                     "train.progress=false", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert [p.name for p in runs_dir.iterdir()] == ["model=tiny,train.eval_every=5,train.max_steps=5"]
    assert "already complete" in second.stderr
    rows = [json.loads(line) for line in (next(runs_dir.iterdir()) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 5]  # trained once, by the first command (log_every=10)


def test_an_extended_sweep_finds_its_finished_runs(tmp_path):
    """Sweep job directories carry no job number: adding a learning rate to a grid trains only the new point."""
    sweep = tmp_path / "sweep"
    common = ("-m", "model=tiny", "train.max_steps=2", "train.batch_size=2", "train.seq_len=32",
              "train.eval_tokens=256", "train.progress=false", f"hydra.sweep.dir={sweep}")
    assert run_cli(*common, "optim.lr=1e-3").returncode == 0
    [first] = [p for p in sweep.iterdir() if p.is_dir()]
    assert first.name.startswith("model=tiny,optim.lr=0.001,")  # no job number in front
    stamp = (first / "summary.json").stat().st_mtime_ns
    log_before = (first / "train.log").read_text()
    extended = run_cli(*common, "optim.lr=2e-3,1e-3")
    assert extended.returncode == 0, extended.stderr[-2000:]
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == sorted([first.name, first.name.replace("optim.lr=0.001", "optim.lr=0.002")])
    assert (first / "summary.json").stat().st_mtime_ns == stamp and "already complete" in extended.stderr
    assert (first / "train.log").read_text() == log_before  # a study's committed logs are not appended to


def test_a_parallel_local_sweep_shares_the_cores_and_matches_a_sequential_one(tmp_path):
    """hydra/launcher=joblib runs jobs side by side, each with its share of the threads; a seeded run's numbers do
    not depend on how the jobs were scheduled; a failed job is listed at the end (exit 2) although it ran in
    another process."""
    common = ("-m", "model=tiny", "train.max_steps=3", "train.batch_size=2", "train.seq_len=32",
              "train.eval_tokens=256", "train.eval_every=3", "train.progress=false", "optim.grad_clip=0",
              "optim.lr=1e6,1e-3,2e-3")
    sequential = run_cli(*common, "train.threads=1", f"hydra.sweep.dir={tmp_path / 'basic'}")
    parallel = run_cli(*common, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                       f"hydra.sweep.dir={tmp_path / 'joblib'}")
    for result in (sequential, parallel):
        assert result.returncode == 2 and "1 run(s) of the sweep failed" in result.stderr, result.stderr[-2000:]
        assert "optim.lr=1000000.0" in result.stderr.split("failed:")[-1]

    def outcomes(sweep):
        return {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / sweep).glob("*/summary.json")}

    basic, joblib = outcomes("basic"), outcomes("joblib")
    assert basic.keys() == joblib.keys() and len(basic) == 3
    for name, summary in joblib.items():
        assert summary["status"] == basic[name]["status"]
        assert summary["val_loss"] == basic[name]["val_loss"]  # bitwise: the same run however scheduled
        assert summary["config"]["train"]["threads"] == max(1, (os.cpu_count() or 1) // 2)
    assert sorted(s["status"] for s in joblib.values()) == ["completed", "completed", "diverged"]


COMPILED_RUNS = """
import json, sys, torch
from moa_train.bench import _compose
from moa_train.builder import build_model
from moa_train.distributed import init_distributed
from moa_train.optim import build_optimizer

env = init_distributed("none", "cpu")
losses = []
for model_name in sys.argv[1:]:  # architectures one after another in this process, as a sweep job runs them
    cfg = _compose([f"model={model_name}", "ffn=qd_moa", "train.compile=true", "train.threads=1", "train.seed=0"])
    model = build_model(cfg, env)
    optimizer = build_optimizer(model, cfg.optim)
    tokens = torch.randint(0, 512, (2, 3, 8, 65), generator=torch.Generator().manual_seed(1))
    run = []
    for x in tokens[0]:
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.append(loss.item())
    with torch.no_grad():
        model.eval()
        run.append(model(tokens[1, 0, :, :-1], tokens[1, 0, :, 1:]).item())
    losses.append(run)
print(json.dumps(dict(torch._dynamo.utils.counters["aot_autograd"])))
print(json.dumps(losses))
"""


def _compiled_runs(*models, env=None):
    """The losses of COMPILED_RUNS over `models` in a fresh process, and its AOTAutograd cache counters."""
    done = subprocess.run([sys.executable, "-c", COMPILED_RUNS, *models], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    counters, losses = done.stdout.strip().splitlines()[-2:]
    return json.loads(losses), json.loads(counters)


@pytest.mark.slow
def test_a_compiled_run_does_not_depend_on_what_its_process_compiled_before():
    """A sweep job process compiles each architecture it meets and keeps them all (make study interleaves
    architectures on purpose): a compiled run's numbers must be those it has in a fresh process."""

    alone = _compiled_runs("dense_60k")[0][0]
    after_others = _compiled_runs("dense_40k", "dense_60k", "dense_40k")[0]
    assert after_others[1] == alone  # bitwise, training and evaluation
    assert after_others[2] == after_others[0]  # and the first architecture again after another
    assert after_others[0] != alone


@pytest.mark.slow
def test_a_process_that_finds_the_compiled_graphs_on_disk_trains_as_the_one_that_compiled_them(tmp_path):
    """A sweep's parallel jobs share inductor's on-disk cache: the second process to compile an architecture
    takes every graph from AOTAutograd's cache, MoA mixing kernels' autograd Functions included
    (parallel.cache_compiled_autograd_functions), and its numbers are those of the process that compiled."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    first, first_counters = _compiled_runs("dense_40k", env=env)
    second, second_counters = _compiled_runs("dense_40k", env=env)
    assert second == first  # bitwise, training and evaluation
    assert first_counters.get("autograd_cache_hit", 0) == 0 and first_counters.get("autograd_cache_saved", 0) >= 2
    assert second_counters.get("autograd_cache_hit", 0) == first_counters["autograd_cache_saved"]
    assert second_counters.get("autograd_cache_bypass", 0) == 0 and second_counters.get("autograd_cache_miss", 0) == 0


def test_a_sweeps_configs_are_checked_in_parallel_and_the_first_bad_one_in_its_order_is_reported(tmp_path,
                                                                                                monkeypatch):
    """Hydra checks that every job's config composes before the first job starts; moa-train shares the checks
    out to forked processes, and still reports the bad config that checking them in order would have found first,
    with Hydra's own error."""
    from types import SimpleNamespace

    from hydra.plugins.sweeper import Sweeper

    from moa_train import cli

    monkeypatch.setattr(Sweeper, "validate_batch_is_legal", Sweeper.validate_batch_is_legal)  # undone after the test
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cli.validate_sweeps_in_parallel()
    composed = tmp_path / "composed"

    class Loader:
        def load_sweep_config(self, master_config, sweep_overrides):
            with open(composed, "a") as f:  # one short line: atomic
                f.write(f"{os.getpid()} {sweep_overrides[0]}\n")
            if "missing" in sweep_overrides[0]:
                raise ConfigCompositionException(f"Could not find '{sweep_overrides[0]}'")

    sweeper = SimpleNamespace(hydra_context=SimpleNamespace(config_loader=Loader()), config={})
    batch = [[f"train.seed={i}"] for i in range(40)]
    Sweeper.validate_batch_is_legal(sweeper, batch)
    lines = [line.split() for line in composed.read_text().splitlines()]
    assert sorted(config for _, config in lines) == sorted(config for [config] in batch)  # each once
    assert len({pid for pid, _ in lines}) == 2 and os.getpid() in {int(pid) for pid, _ in lines}

    batch[21] = ["ffn=missing_first"]  # a child's share (odd positions)
    batch[30] = ["ffn=missing_later"]  # this process's share, which it checks before hearing from the child
    with pytest.raises(ConfigCompositionException, match="missing_first"):
        Sweeper.validate_batch_is_legal(sweeper, batch)
    composed.unlink()
    Sweeper.validate_batch_is_legal(sweeper, batch[:16])  # too few to share out: checked here, one by one
    assert {int(line.split()[0]) for line in composed.read_text().splitlines()} == {os.getpid()}


VECTOR_ISA_CHECKS = """
import json, sys
from pathlib import Path
import torch._inductor.cpu_vec_isa as vec
from moa_train.parallel import remember_vector_isa_checks

loads = []  # the test programs inductor loads in a fresh Python process, one per check it runs
probe = vec.VecISA._probe_load
vec.VecISA._probe_load = lambda isa, path: loads.append(path) or probe(isa, path)
if sys.argv[2] == "failing":
    vec.VecISA.check_build = lambda isa, code: False
remember_vector_isa_checks(Path(sys.argv[1]))
isa = vec.pick_vec_isa()
print(json.dumps({"isa": str(isa), "flags": isa.build_arch_flags(), "loads": len(loads)}))
"""


def _vector_isa_checks(cache: Path, mode: str = "real") -> dict:
    done = subprocess.run([sys.executable, "-c", VECTOR_ISA_CHECKS, str(cache), mode], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="inductor checks x86 vector ISAs only")
def test_inductors_vector_isa_checks_are_remembered_per_machine(tmp_path):
    """A process that finds inductor's passed ISA checks in the machine cache runs none of them (each loads a
    test program in a fresh Python process: 1.5 s a process) and picks the same ISA with the same flags; a check
    that failed is not remembered, so the next process checks again."""
    from moa_train.parallel import VECTOR_ISA_FILE

    failing = _vector_isa_checks(tmp_path / "failing", "failing")
    assert failing["isa"] == "INVALID_VEC_ISA" and not (tmp_path / "failing" / VECTOR_ISA_FILE).exists()
    first = _vector_isa_checks(tmp_path / "cache")
    second = _vector_isa_checks(tmp_path / "cache")
    assert first["loads"] > 0 and second["loads"] == 0
    assert (second["isa"], second["flags"]) == (first["isa"], first["flags"])
    [checks] = json.loads((tmp_path / "cache" / VECTOR_ISA_FILE).read_text()).values()  # one machine
    assert len(checks) == first["loads"] and all(passed is True for passed in checks.values())


def test_an_optuna_learning_rate_search_reports_its_best_run(tmp_path):
    """sweep=lr_optuna: each trial is a run; the objective Optuna minimises is the run's final val loss, so its
    reported best is the best run's; proposals stay in the interval and repeat with the sampler's seed."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the optuna extra is not installed")
    import yaml

    def search(name):
        result = run_cli("sweep=lr_optuna", "model=tiny", "train.max_steps=3", "train.batch_size=2",
                         "train.seq_len=32", "train.eval_tokens=256", "train.eval_every=3", "hydra.sweeper.n_trials=3",
                         "hydra.sweeper.n_jobs=1", f"hydra.sweep.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-3000:]
        runs = [json.loads(p.read_text()) for p in (tmp_path / name).glob("*/summary.json")]
        return runs, yaml.safe_load((tmp_path / name / "optimization_results.yaml").read_text())

    runs, best = search("first")
    assert len(runs) == 3 and all(r["status"] == "completed" for r in runs)
    lrs = sorted(r["config"]["optim"]["lr"] for r in runs)
    assert all(1e-3 <= lr <= 1e-1 for lr in lrs) and len(set(lrs)) == 3
    winner = min(runs, key=lambda r: r["val_loss"])
    assert best["best_value"] == pytest.approx(winner["val_loss"], rel=1e-12)
    assert best["best_params"]["optim.lr"] == pytest.approx(winner["config"]["optim"]["lr"], rel=1e-12)
    again, _ = search("again")
    assert sorted(r["config"]["optim"]["lr"] for r in again) == lrs  # TPESampler seed 0


def test_dry_run_and_refused_config_leave_no_run_directory(tmp_path):
    assert run_cli("model=tiny", "ffn=moa1", "dry_run=true", cwd=tmp_path).returncode == 0
    refused = run_cli("model=tiny", "optim.lr=-1", cwd=tmp_path)
    assert refused.returncode == 2 and "optim.lr" in refused.stderr
    assert not (tmp_path / "outputs" / "runs").exists() or not any((tmp_path / "outputs" / "runs").iterdir())


def test_unknown_dist_mode_is_refused():
    cfg = compose_config("dist.name=horovod")
    with pytest.raises(ConfigError, match="Accepted: auto, none, ddp, fsdp"):
        validate_config(cfg)


def test_a_run_recorded_before_a_key_existed_is_the_same_run_at_that_keys_default():
    """Runs written before the schema gained a key (e.g. ffn.match_params_of) are neither retrained nor
    regrouped: a missing key counts at its default, and only there."""
    from moa_train.checkpoint import config_differences
    from moa_train.config import to_container

    current = to_container(compose_config("model=tiny", "ffn=swiglu"))
    old = json.loads(json.dumps(current))
    del old["ffn"]["match_params_of"], old["train"]["threads"], old["data"]["parts"]
    assert config_differences(old, current, only=None) == []
    widened = json.loads(json.dumps(current))
    widened["ffn"]["match_params_of"] = "qd_moa"
    assert config_differences(old, widened, only=None) == ["ffn.match_params_of: None -> 'qd_moa'"]


def test_keys_a_baseline_does_not_read_do_not_make_it_another_run():
    """Changing a mixture default (ffn.init) must not make finished relu2 / swiglu runs look unfinished."""
    from moa_train.checkpoint import config_differences
    from moa_train.config import to_container

    for ffn, same in (("relu2", True), ("moa1", False)):
        current = to_container(compose_config("model=tiny", f"ffn={ffn}"))
        other = json.loads(json.dumps(current))
        other["ffn"]["init"] = "uniform" if current["ffn"]["init"] != "uniform" else "normalized"
        assert (config_differences(other, current, only=None) == []) is same, ffn


def test_help_lists_every_group_as_hydra_does_and_leaves_hydra_as_it_was(tmp_path):
    """--help shares one config repository among Hydra's group listings (cli.one_config_repository):
    the text must be Hydra's own, and later compositions in the process must not see the sharing."""
    shared = run_cli("--help", cwd=tmp_path)
    assert shared.returncode == 0, shared.stderr
    plain = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['moa-train', '--help']; "
                            "from moa_train.config import register_configs; register_configs(); "
                            "from moa_train.cli import hydra_main; hydra_main()"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert plain.returncode == 0, plain.stderr
    assert shared.stdout == plain.stdout
    for group, option in (("ffn", "qd_moa"), ("model", "dense_0.12b"), ("optim", "muon"), ("sweep", "cpu_study")):
        line = next(line for line in shared.stdout.splitlines() if line.startswith(f"{group}: "))
        assert option in line.split(": ", 1)[1].split(", ")

    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    from moa_train.cli import one_config_repository

    original = ConfigLoaderImpl._parse_overrides_and_create_caching_repo
    with one_config_repository():
        assert ConfigLoaderImpl._parse_overrides_and_create_caching_repo is not original
    assert ConfigLoaderImpl._parse_overrides_and_create_caching_repo is original
