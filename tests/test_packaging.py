"""A plain (non-editable) install carries every module and config: the wheel is checked, then used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_holds_all_packages_and_configs_and_runs(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(tmp_path.glob("moa_train-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "moa_train").rglob("*.py")}
    configs = {"moa_train/conf/" + str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert modules - names == set()
    assert configs - names == set()
    # the installed copy, not the source tree, composes a config (pkg://moa_train.conf)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONSAFEPATH": "1"}
    result = subprocess.run([sys.executable, "-m", "moa_train", "model=tiny_moe", "ffn=qd_moa", "dry_run=true"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["model"] == "tiny_moe"
    probe = subprocess.run([sys.executable, "-c", "import moa_train; print(moa_train.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, env=env)
    assert probe.stdout.startswith(str(target))
