"""What a step reports (MFU on every device, peak memory, train.log's step lines, the progress bar) and
activation checkpointing: the same losses with less memory."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys

import pytest
import torch

from conftest import compose_config, read_jsonl, run_cli
from moa_train import hardware
from moa_train.budget import flops_per_token
from moa_train.builder import build_model
from moa_train.config import validate_config
from moa_train.distributed import DistEnv
from moa_train.errors import ConfigError
from moa_train.moe.layer import MoE
from moa_train.parallel import checkpointed_blocks
from moa_train.train import duration, progress_figures, step_line

CPU = DistEnv("none", 0, 1, 0, torch.device("cpu"))


# ----------------------------------------------------------------------------- MFU and memory


def test_the_cpu_peak_is_the_best_of_the_first_runs_probes_per_machine_and_thread_count(tmp_path, monkeypatch):
    rates = iter([1.0e11, 1.75e11, 1.5e11, 9e11])  # the first probe in a slow phase; the fourth is never taken
    probes = []
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda: probes.append(1) or next(rates))
    assert [hardware.cpu_peak_flops(tmp_path) for _ in range(hardware.PEAK_PROBES + 2)] == \
        [1.0e11, 1.75e11, 1.75e11, 1.75e11, 1.75e11]
    assert len(probes) == hardware.PEAK_PROBES == 3  # later runs read the cache
    cached = json.loads((tmp_path / hardware.PEAK_FILE).read_text())
    (key,) = cached
    assert f"{torch.get_num_threads()} threads" in key and torch.__version__ in key
    assert cached[key] == {"peak": 1.75e11, "probes": 3}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # another thread count is another peak
        monkeypatch.setattr(hardware, "measure_matmul_flops", lambda: probes.append(1) or 2e11)
        assert hardware.cpu_peak_flops(tmp_path) == 2e11
    finally:
        torch.set_num_threads(threads)
    assert len(probes) == 4 and len(json.loads((tmp_path / hardware.PEAK_FILE).read_text())) == 2


def test_an_older_caches_single_figure_counts_as_one_probe(tmp_path, monkeypatch):
    key = hardware.peak_cache_key()
    (tmp_path / hardware.PEAK_FILE).write_text(json.dumps({key: 1.6e11}))
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda: 1.2e11)
    assert hardware.cpu_peak_flops(tmp_path) == 1.6e11  # a lower probe does not lower the peak
    assert json.loads((tmp_path / hardware.PEAK_FILE).read_text())[key] == {"peak": 1.6e11, "probes": 2}


def test_an_unreadable_peak_cache_is_measured_again(tmp_path, monkeypatch):
    (tmp_path / hardware.PEAK_FILE).write_text("{not json")
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda: 2e11)
    assert hardware.cpu_peak_flops(tmp_path) == 2e11
    assert list(json.loads((tmp_path / hardware.PEAK_FILE).read_text()).values()) == [{"peak": 2e11, "probes": 1}]


def test_the_matmul_probe_measures_a_plausible_rate():
    rate = hardware.measure_matmul_flops(size=256, repeats=3)
    assert 1e8 < rate < 1e14  # between a very slow core and far more than any CPU


def test_the_peak_is_kept_per_linear_backend(monkeypatch):
    """The probe runs the products the linear layers use (linear.py), so each backend has its own peak."""
    from moa_train import linear

    before = linear.cpu_linear_backend()
    monkeypatch.setattr(linear, "onednn_available", lambda: True)
    try:
        keys = [(linear.set_cpu_linear(mode), hardware.peak_cache_key())[1] for mode in ("blas", "onednn")]
    finally:
        linear.set_cpu_linear(before)
    assert keys[0] != keys[1] and keys[0].endswith("| blas") and keys[1].endswith("| onednn")


def test_peak_memory_follows_the_step_not_the_process():
    import mmap

    device = torch.device("cpu")
    hardware.reset_peak_memory(device)
    before = hardware.peak_memory_mib(device)
    # 64 MiB, touched, then unmapped: mapped directly, since malloc keeps freed memory in a process where a run
    # asked it to (hardware.reuse_freed_memory), and then the resident set stays up
    big = mmap.mmap(-1, 64 * 2**20)
    for page in range(0, len(big), mmap.PAGESIZE):
        big[page] = 1
    with_big = hardware.peak_memory_mib(device)
    big.close()
    hardware.reset_peak_memory(device)
    after = hardware.peak_memory_mib(device)
    assert with_big - before > 48
    assert after < with_big - 48  # the reset forgot the unmapped memory's peak


# Page faults of a few training steps of a small model, after two warm-up steps
STEP_FAULTS = """
import resource, sys, torch
from moa_train.budget import flops_per_token
from moa_train.builder import build_model
from moa_train.config import compose_run_config
from moa_train.distributed import init_distributed
cfg = compose_run_config(["model=tiny", "model.n_layers=1", "train.batch_size=8",
                          "train.cpu_reuse_freed_memory=" + sys.argv[1]])
model = build_model(cfg, init_distributed("none", "cpu"))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, cfg.model.vocab_size, (8, cfg.train.seq_len + 1), generator=torch.Generator().manual_seed(0))
def step():
    model(x[:, :-1], x[:, 1:]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _step_faults(reuse: bool) -> int:
    done = subprocess.run([sys.executable, "-c", STEP_FAULTS, str(reuse).lower()], capture_output=True, text=True,
                          check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_step_reuses_the_memory_the_last_step_freed_instead_of_faulting_in_new_pages():
    default, reused = _step_faults(False), _step_faults(True)
    # 4 steps: glibc unmaps and trims, over 16 MiB of fresh pages a step (measured: ~8,500 faults a step)
    assert default > 4 * 4096
    assert reused < default / 5  # measured: 160-490 a step


def test_a_tuned_allocator_is_left_alone(monkeypatch):
    monkeypatch.setattr(hardware.ctypes, "CDLL", lambda *a: pytest.fail("mallopt called"))
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert hardware.reuse_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")  # jemalloc, tcmalloc, mimalloc
    assert hardware.reuse_freed_memory() is False


def test_the_allocator_setting_is_made_only_for_cpu_runs_that_want_it(monkeypatch):
    from moa_train import parallel

    calls = []
    monkeypatch.setattr(hardware, "reuse_freed_memory", lambda: calls.append(1) or True)
    parallel.configure_backends(torch.device("cpu"), reuse_freed_memory=False)
    parallel.configure_backends(torch.device("meta"))
    assert calls == []
    parallel.configure_backends(torch.device("cpu"))
    assert calls == [1]


# ----------------------------------------------------------------------------- step lines and progress bar


def test_duration_and_step_line():
    assert [duration(s) for s in (0, 45.4, 725, 11220)] == ["0s", "45s", "12m05s", "3h07m"]
    row = {"step": 120, "train_loss": 5.23412, "lr": 3e-3, "tokens_per_s": 24512.3, "mfu": 0.1823,
           "peak_memory_mib": 411.6}
    assert step_line(row, 5.30119, 300, 72) == ("step 120/300 | loss 5.2341 | val 5.3012 | lr 3.00e-03 | "
                                                "24,512 tok/s | mfu 18.2% | mem 412 MiB | eta 1m12s")
    assert step_line({**row, "mfu": None}, None, 300, 5) == ("step 120/300 | loss 5.2341 | lr 3.00e-03 | "
                                                             "24,512 tok/s | mem 412 MiB | eta 5s")
    assert progress_figures(row, None) == {"loss": "5.234", "val": "-", "lr": "3.0e-03", "tok/s": "24,512",
                                           "mfu": "18.2%"}


STEP_LINE = re.compile(r"step (\d+)/20 \| loss [\d.]+ \|( val [\d.]+ \|)? lr [\d.e+-]+ \| [\d,]+ tok/s \| "
                       r"mfu [\d.]+% \| mem [\d,]+ MiB \| eta \w+")


def test_a_cpu_run_logs_mfu_and_memory_in_every_row_and_step_lines_in_train_log(tmp_path, shared_data_cache):
    run_dir = tmp_path / "run"
    result = run_cli("model=tiny", "train.max_steps=20", "train.eval_every=10", "train.log_every=5",
                     f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 20]
    for row in rows:
        assert "mfu" in row and row["peak_memory_mib"] > 50  # torch alone holds more than that
    # Every row's MFU is its throughput times the model's FLOPs per token over the peak the probe cached.
    # (Not `mfu < 1`: a probe that ran during one of this shared machine's slow phases can read a peak
    # below what the run then reaches.)
    summary = json.loads((run_dir / "summary.json").read_text())
    cached_peaks = [entry["peak"] for entry in  # one per thread count
                    json.loads((shared_data_cache / hardware.PEAK_FILE).read_text()).values()]
    per_token = flops_per_token(summary["params"]["active"], 4096, 128, 4, 256)  # model=tiny
    peaks = [row["tokens_per_s"] * per_token / row["mfu"] for row in rows[1:]]
    assert all(row["mfu"] > 0 for row in rows[1:])
    assert any(peaks[0] == pytest.approx(cached, rel=1e-6) for cached in cached_peaks)
    assert peaks == pytest.approx([peaks[0]] * len(peaks), rel=1e-6)
    lines = [m.group(0) for m in STEP_LINE.finditer((run_dir / "train.log").read_text())]
    assert [int(STEP_LINE.match(line).group(1)) for line in lines] == [5, 10, 15, 20]
    assert "val" in lines[1] and "eta 0s" in lines[-1]
    assert "mfu=" in result.stderr and "tok/s=" in result.stderr  # the progress bar shows them too


# ----------------------------------------------------------------------------- activation checkpointing


def test_which_blocks_are_checkpointed():
    assert checkpointed_blocks(8, "none", 2) == []
    assert checkpointed_blocks(8, "full", 2) == list(range(8))
    assert checkpointed_blocks(8, "selective", 2) == [1, 3, 5, 7]
    assert checkpointed_blocks(8, "selective", 3) == [2, 5]
    assert checkpointed_blocks(3, "selective", 1) == [0, 1, 2]


def _train(overrides: tuple[str, ...], steps: int = 6):
    cfg = compose_config("model.n_layers=4", "train.seq_len=64", *overrides)
    model = build_model(cfg, CPU)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses, loads = [], []
    for _ in range(steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (4, 65), generator=generator)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        loads.append([m.step_load.clone() for m in model.modules() if isinstance(m, MoE)])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for m in model.modules():
            if isinstance(m, MoE):
                m.step_load.zero_()
        losses.append(loss.item())
    return losses, loads, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model", ["tiny", "tiny_moe"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_changes_no_number(model, mode):
    """The same losses, weights and MoE load counts (the recomputation does not count tokens twice)."""
    base = ("model=" + model, "ffn=qd_moa")
    plain = _train(base)
    checkpointed = _train((*base, f"train.activation_checkpointing={mode}"))
    assert plain[0] == pytest.approx(checkpointed[0], rel=1e-6, abs=0)
    for a, b in zip(plain[1], checkpointed[1]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    if model == "tiny_moe":
        assert plain[1][0] and plain[1][0][0].sum() > 0  # loads were counted, once
    assert plain[2].keys() == checkpointed[2].keys()  # parameter names unchanged: checkpoints interchange
    for key, value in plain[2].items():
        torch.testing.assert_close(value, checkpointed[2][key], rtol=1e-5, atol=1e-7)


def test_activation_checkpointing_recomputes_the_chosen_blocks():
    """Checkpointed blocks run their forward twice per step (once more in the backward), the others once."""
    cfg = compose_config("model=tiny", "model.n_layers=4", "train.seq_len=32",
                         "train.activation_checkpointing=selective")
    model = build_model(cfg, CPU)
    calls = [0] * 4
    for i, block in enumerate(model.layers):
        block.attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 33))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    assert calls == [1, 2, 1, 2]


@pytest.mark.parametrize("overrides, key", [
    (("train.activation_checkpointing=some",), "train.activation_checkpointing"),
    (("train.activation_checkpointing=selective", "train.activation_checkpointing_every=0"),
     "train.activation_checkpointing_every"),
    (("model=tiny", "train.activation_checkpointing=selective", "train.activation_checkpointing_every=9"),
     "train.activation_checkpointing_every"),
])
def test_bad_activation_checkpointing_values_are_refused(overrides, key):
    with pytest.raises(ConfigError) as info:
        validate_config(compose_config(*overrides))
    assert info.value.key == key
    assert "none, full, selective" in str(info.value) or "1 to" in str(info.value) or "must be" in str(info.value)
