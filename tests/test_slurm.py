"""The launch scripts: syntax, shellcheck, --dry-run, and a fake-Slurm run on one machine.

The fake Slurm is two shims on PATH: ``srun`` drops its own options and runs the command once
(one node, one task) and ``scontrol`` answers ``show hostnames`` with localhost and records
``requeue``. Everything else -- torchrun's c10d rendezvous, two gloo workers, the planner check,
checkpoints, the preemption trap -- is the real thing.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_training import sotu_data  # noqa: F401  (the real-data fixture)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["slurm/pretrain_7b.sh", "slurm/pretrain_multinode.sh", "examples/torchrun_single_node.sh"]
# Methods allowed to have no examples/configs/7b_<method>.yaml (every other method needs one,
# and slurm/pretrain_7b.sh's planner check runs on it): keep this list explicit and short.
WITHOUT_7B_CONFIG: set[str] = set()
# Slurm variables of the machine running the tests must not leak into the scripts.
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    from tests.conftest import require

    out = subprocess.run([require("shellcheck", tool=True), "-x", str(REPO / script)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _dry_run(script: str, env: dict[str, str], *args: str) -> tuple[list[str], str]:
    """Run ``script --dry-run``; returns the printed training command (as argv) and the output."""
    out = subprocess.run(["bash", str(REPO / script), "--dry-run", *args], capture_output=True,
                         text=True, env={**CLEAN_ENV, **env}, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    command = text.split("== plan")[0].split("\n", 1)[1]
    return shlex.split(command.replace("\\\n", " ")), text


def test_dry_run_prints_the_command_and_the_plan():
    argv, text = _dry_run("slurm/pretrain_7b.sh", {"MASTER_ADDR": "node001", "RDZV_ID": "77"})
    torchrun = argv.index("torchrun")
    assert argv[:torchrun][0] == "srun" and "--nodes=4" in argv and "--ntasks-per-node=1" in argv
    pairs = dict(zip(argv[torchrun + 1::2], argv[torchrun + 2::2]))
    assert pairs["--nnodes"] == "4" and pairs["--nproc-per-node"] == "8"
    assert pairs["--rdzv-backend"] == "c10d" and pairs["--rdzv-endpoint"] == "node001:29500"
    assert pairs["--rdzv-id"] == "77"
    module = argv.index("-m")
    assert argv[module + 1] == "megatron_latentcot.pretrain"
    assert argv[module + 2:module + 4] == ["--config", "examples/configs/7b_adaptive.yaml"]
    overrides = dict(a.split("=", 1) for a in argv[module + 4:])
    assert overrides["train.load"] == overrides["train.save"] == "runs/7b_adaptive/checkpoints"
    assert overrides["parallel.zero"] == "fsdp2"
    assert overrides["data.data_path"] == "[data/pile_text_document]"
    assert overrides["train.tensorboard_dir"] == "runs/7b_adaptive/logs/tensorboard"
    # the planner's report for the same layout
    assert "== plan: examples/configs/7b_adaptive.yaml" in text
    assert "TP 4 x PP 1 x DP 8 = 32 GPUs = 4 node(s) x 8 GPUs" in text
    assert "PEAK" in text and "FLOPs/token" in text and "OK: fits" in text


def test_dry_run_env_overrides_reach_command_and_planner():
    env = {"METHOD": "vanilla", "TP": "8", "SP": "true", "MICRO_BATCH": "1", "NNODES": "2",
           "RECOMPUTE": "true", "DATA_PATH": "0.7 /d/pile_a 0.3 /d/pile_b", "SAVE": "/ckpt/x",
           "WANDB_PROJECT": "latent", "MASTER_PORT": "31000", "MASTER_ADDR": "n1"}
    argv, text = _dry_run("slurm/pretrain_7b.sh", env, "train.lr=1e-4")
    overrides = dict(a.split("=", 1) for a in argv[argv.index("-m") + 4:])
    assert argv[argv.index("--config") + 1] == "examples/configs/7b_vanilla.yaml"
    assert overrides["parallel.tensor_model_parallel_size"] == "8"
    assert overrides["parallel.sequence_parallel"] == "true"
    assert overrides["train.micro_batch_size"] == "1" and overrides["train.recompute"] == "true"
    assert overrides["data.data_path"] == "[0.7, /d/pile_a, 0.3, /d/pile_b]"
    assert overrides["train.save"] == overrides["train.load"] == "/ckpt/x"
    assert overrides["train.wandb_project"] == "latent" and overrides["train.lr"] == "1e-4"
    assert "n1:31000" in argv
    assert "TP 8 x PP 1 x DP 2 = 16 GPUs" in text and "sequence parallel on" in text
    assert "micro 1 x 128 micro-batches" in text


def test_multinode_template_dry_run():
    argv, text = _dry_run("slurm/pretrain_multinode.sh", {"SIZE": "1.4b", "METHOD": "pondering"})
    assert argv[argv.index("--config") + 1] == "examples/configs/1.4b_pondering.yaml"
    assert "--nodes=2" in argv
    assert "TP 1 x PP 1 x DP 16 = 16 GPUs" in text and "OK: fits" in text


@pytest.mark.parametrize("var,value,field", [("PP", "2", "pipeline_model_parallel_size"),
                                             ("SP", "true", "sequence_parallel")])
def test_layout_comments_and_planner_follow_the_config_table(var, value, field):
    """The script's PP / SP comments name exactly the methods config.py's table refuses, and
    its planner refuses exactly those (the 7B configs: K_max 4, TP 4)."""
    import dataclasses

    from megatron_latentcot.config import METHODS, Config, layout_refusal

    base = Config()
    refused = {m for m in METHODS if layout_refusal(dataclasses.replace(
        base, latent=dataclasses.replace(base.latent, method=m, max_steps=4),
        parallel=dataclasses.replace(base.parallel, **{field: int(value) if var == "PP" else True})))}
    line = next(x for x in (REPO / "slurm/pretrain_7b.sh").read_text().splitlines()
                if x.startswith(f"{var}=${{{var}-}}"))
    assert set(line.split("not for:")[1].split()) == refused, line
    with_config = [m for m in METHODS if (REPO / f"examples/configs/7b_{m}.yaml").exists()]
    assert set(METHODS) - set(with_config) == WITHOUT_7B_CONFIG
    for method in with_config:
        _, text = _dry_run("slurm/pretrain_7b.sh", {"METHOD": method, var: value})
        assert ("(planner exit code 2)" in text) == (method in refused), (method, text[-500:])


# -- fake Slurm -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_slurm(tmp_path: Path) -> Path:
    """``srun`` and ``scontrol`` shims in tmp_path/bin; calls are logged to tmp_path/*.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"""#!/usr/bin/env bash
echo "$@" >> {tmp_path}/srun.log
while [[ "${{1:-}}" == -* ]]; do shift; done   # srun's own options (all --opt=value)
exec "$@"
""")
    (bin_dir / "scontrol").write_text(f"""#!/usr/bin/env bash
case "$1 ${{2:-}}" in
  "show hostnames") echo localhost ;;
  requeue*) echo "$2" >> {tmp_path}/requeue.log ;;
  *) echo "fake scontrol: unsupported: $*" >&2; exit 1 ;;
esac
""")
    for shim in ("srun", "scontrol"):
        (bin_dir / shim).chmod(0o755)
    return bin_dir


def _slurm_env(tmp_path: Path, data: dict[str, str], iters: int) -> dict[str, str]:
    return {
        **CLEAN_ENV,
        "PATH": f"{_fake_slurm(tmp_path)}:{os.environ['PATH']}",
        "REPO_DIR": str(REPO), "PYTHONPATH": str(REPO),
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "fake-node", "SLURM_JOB_NUM_NODES": "1",
        "GPUS_PER_NODE": "2", "CONFIG": "examples/configs/tiny.yaml", "RUN_NAME": "fake",
        "RUN_ROOT": str(tmp_path / "runs"), "BACKEND": "gloo", "ZERO": "fsdp2",
        "MICRO_BATCH": "4", "GLOBAL_BATCH": "8", "TRAIN_ITERS": str(iters), "SAVE_INTERVAL": "2",
        "SEQ_LENGTH": "64", "DATA_PATH": data["train"], "VALID_PATH": data["valid"],
        "TOKENIZER_TYPE": "sentencepiece", "TOKENIZER_MODEL": data["tokenizer"],
        "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1", "NCCL_DEBUG": "",
        "PLAN_CHECK": "1", "GPU": "H100",
    }


TINY_MODEL = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
              "model.num_query_groups=2", "model.ffn_hidden_size=160", "model.vocab_size=4096",
              "data.heldout_path=null", "train.eval_iters=1", "train.eval_interval=0",
              "train.log_interval=1", "train.lr_warmup_iters=1"]


# Runs in CI (the scale-out issue asks for it): two torchrun launches of two workers, ~1 minute.
def test_fake_slurm_run_to_checkpoint_then_resume(tmp_path, sotu_data):  # noqa: F811
    """sbatch-equivalent run: planner check, srun -> torchrun (c10d) -> 2 gloo workers, FSDP2
    over DP 2, real text, checkpoints; then the same job again resumes from ``latest``."""
    env = _slurm_env(tmp_path, sotu_data, iters=4)
    script = str(REPO / "slurm/pretrain_7b.sh")
    first = subprocess.run(["bash", script, *TINY_MODEL], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    save = tmp_path / "runs" / "fake" / "checkpoints"
    assert (save / "latest").read_text().strip() == "iter_0000004"
    import json

    manifest = json.loads((save / "iter_0000004" / "manifest.json").read_text())
    assert manifest["layout"] == {"tp": 1, "pp": 1, "dp": 2, "world": 2}
    assert set(manifest["files"]) == {"rank_00000.pt", "rank_00001.pt"}
    assert "OK: fits" in (tmp_path / "runs" / "fake" / "logs" / "plan.txt").read_text()
    srun = (tmp_path / "srun.log").read_text()
    assert "--rdzv-backend c10d" in srun and "--rdzv-endpoint localhost:" in srun
    assert "--nproc-per-node 2" in srun and f"train.load={save}" in srun
    assert not (tmp_path / "requeue.log").exists()

    env["TRAIN_ITERS"] = "6"  # the requeued job: same command, resumes from latest
    second = subprocess.run(["bash", script, *TINY_MODEL], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resumed from {save / 'iter_0000004'} at iteration 4" in second.stdout
    assert (save / "latest").read_text().strip() == "iter_0000006"


@pytest.mark.slow
def test_fake_slurm_preemption_saves_and_requeues(tmp_path, sotu_data):  # noqa: F811
    """SIGUSR1 to the batch shell (Slurm's --signal=B:USR1): the trap forwards it down to the
    workers, they save and stop, the script requeues the job and exits 0."""
    env = _slurm_env(tmp_path, sotu_data, iters=10_000)
    proc = subprocess.Popen(["bash", str(REPO / "slurm/pretrain_7b.sh"), *TINY_MODEL], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    deadline = time.time() + 400
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter ") and "| loss " in line:  # training is under way
            proc.send_signal(signal.SIGUSR1)
            break
        assert time.time() < deadline, "".join(lines[-50:])
    rest, _ = proc.communicate(timeout=400)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output[-4000:]
    assert (tmp_path / "requeue.log").read_text().strip() == "4242", output[-4000:]
    save = tmp_path / "runs" / "fake" / "checkpoints"
    latest = (save / "latest").read_text().strip()
    assert latest.startswith("iter_") and 0 < int(latest[5:]) < 10_000
    assert "requeueing job 4242" in output


def test_planner_rejection_stops_the_launch(tmp_path):
    """PLAN_CHECK=1: a layout the planner rejects exits with its code before srun runs."""
    env = {**CLEAN_ENV, "PATH": f"{_fake_slurm(tmp_path)}:{os.environ['PATH']}",
           "REPO_DIR": str(REPO), "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1",
           "SLURM_JOB_NUM_NODES": "1", "RUN_ROOT": str(tmp_path / "runs"),
           "MICRO_BATCH": "64", "GLOBAL_BATCH": "512", "TORCHRUN": "true"}
    out = subprocess.run(["bash", str(REPO / "slurm/pretrain_7b.sh")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "DOES NOT FIT" in out.stdout and "the planner rejects this layout" in out.stderr
    assert not (tmp_path / "srun.log").exists()
