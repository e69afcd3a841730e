"""Parameter roles survive the wrappers: DDP and FSDP2 give every parameter the role it has unwrapped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ROLES_UNDER_WRAPPERS = r"""
import json, os, torch, torch.distributed as dist
from hydra import compose, initialize_config_module
import moa_train.config
moa_train.config.register_configs()
from moa_train.model import Transformer
from moa_train.optim import parameter_roles

def names(model, roles):
    by_id = {id(p): n for n, p in getattr(model, "module", model).named_parameters()}
    return {role: sorted(by_id[id(p)] for p in params) for role, params in roles.items()}

dist.init_process_group("gloo", rank=0, world_size=1)
with initialize_config_module(config_module="moa_train.conf", version_base="1.3"):
    cfg = compose(config_name="config", overrides=["model=tiny", "model.n_layers=2", "ffn=bi_moa"])
result = {}
for mode in ("plain", "ddp", "fsdp"):
    model = Transformer(cfg.model, cfg.ffn)
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    result[mode] = names(model, parameter_roles(model))
print(json.dumps(result))
dist.destroy_process_group()
os._exit(0)
"""


def _free_port() -> int:
    with socket.socket() as probe:  # another test process may be running a process group of its own
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_parameter_roles_are_the_same_under_ddp_and_fsdp():
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", ROLES_UNDER_WRAPPERS], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    roles = json.loads(done.stdout.strip().splitlines()[-1])
    plain = roles["plain"]
    assert plain["mixing"] == ["layers.0.ffn.gates.weight", "layers.1.ffn.gates.weight"]
    assert plain["head"] == ["output.weight"] and plain["embedding"] == ["tok_embeddings.weight"]
    assert len(plain["matrix"]) == 2 * (4 + 3)
    assert roles["ddp"] == plain
    assert roles["fsdp"] == plain  # fully_shard replaces the Parameters: marks must survive it
