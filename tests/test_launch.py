"""``srun python -m megatron_latentcot.pretrain``: the rendezvous comes from Slurm's environment.

srun sets ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, the node list and the job id, but
no ``MASTER_ADDR``/``MASTER_PORT``: ``parallel.py`` derives them (first host of the node list,
``10000 + SLURM_JOB_ID % 50000``) without calling ``scontrol``.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_latentcot.parallel import LaunchError, expand_nodelist, slurm_rendezvous

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("nodelist, hosts", [
    ("localhost", ["localhost"]),
    ("node[001-004,007]", ["node001", "node002", "node003", "node004", "node007"]),
    ("gpu-a[1,3]", ["gpu-a1", "gpu-a3"]),
    ("n[08-10],login1,gpu-a[1,3]", ["n08", "n09", "n10", "login1", "gpu-a1", "gpu-a3"]),
    ("rack[1-2]-n[7,9]", ["rack1-n7", "rack1-n9", "rack2-n7", "rack2-n9"]),
    ("10.0.0.5,10.0.0.6", ["10.0.0.5", "10.0.0.6"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "node[1-3", "node]1", "a,,b", "n[4-2]", "n[a-b]", "n[1,]"])
def test_malformed_nodelist_is_one_clear_error(bad):
    with pytest.raises(LaunchError, match=r"Slurm node list .*expected"):
        expand_nodelist(bad)


def test_slurm_rendezvous_defaults_and_explicit_values_win():
    env = {"SLURM_JOB_NODELIST": "gpu-b[017-018,020]", "SLURM_JOB_ID": "1234567"}
    assert slurm_rendezvous(env) == {"MASTER_ADDR": "gpu-b017", "MASTER_PORT": "44567"}
    assert slurm_rendezvous({"SLURM_NODELIST": "x[2-3]", "SLURM_JOBID": "7"}) == \
        {"MASTER_ADDR": "x2", "MASTER_PORT": "10007"}
    assert slurm_rendezvous({**env, "MASTER_ADDR": "head", "MASTER_PORT": "29500"}) == {}
    assert slurm_rendezvous({}) == {}
    with pytest.raises(LaunchError, match="SLURM_JOB_ID='12_3' is not an integer"):
        slurm_rendezvous({"SLURM_JOB_ID": "12_3"})


def _free_slurm_port() -> int:
    """A free port in the range Slurm job ids map to (10000..59999)."""
    for _ in range(100):
        port = random.randrange(10000, 60000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 10000..59999")


_WORKER = """
import os, torch, torch.distributed as dist
from megatron_latentcot.config import ParallelConfig
from megatron_latentcot.parallel import destroy_distributed, init_distributed
ctx = init_distributed(ParallelConfig(backend="gloo", timeout_minutes=1.0))
t = torch.tensor([ctx.rank + 1.0])
dist.all_reduce(t)
print(ctx.rank, ctx.world_size, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], t.item())
destroy_distributed()
"""


def test_two_srun_tasks_rendezvous_from_the_slurm_environment():
    """Two processes with only srun's SLURM_* variables (no RANK, WORLD_SIZE, MASTER_*) start
    one group of two on the node list's first host and the job id's port, and all-reduce."""
    port = _free_slurm_port()
    job_id = 50000 * 7 + port - 10000
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    base.update(SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST="localhost,node[2-3]",
                SLURM_NTASKS="2", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER], cwd=REPO, text=True,
                              env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err
        assert out.split() == [str(r), "2", "localhost", str(port), "3.0"], (out, err)
