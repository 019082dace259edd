"""Bad input to the command lines is one line naming the file, exit code 2, no traceback.

Covers ``python -m megatron_latentcot.pretrain`` (world 1, and world 2 as torchrun launches it)
and ``tools/generate.py``, ``tools/evaluate.py``, ``tools/export_hf.py``, for each class of bad
input: a corrupt or missing ``.idx``, a truncated ``.bin``, a dataset of another tokenizer, a
missing run directory, a truncated checkpoint or export. A failure while training (a failed
save) stays exit code 1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.inference_utils import TINY, save_world_of_one

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
TOKENIZER = GOLDEN / "sotu_bpe1k.model"
MODEL = [*TINY, "model.vocab_size=1024", f"data.tokenizer_model={TOKENIZER}"]
TRAIN = ["train.micro_batch_size=2", "train.global_batch_size=4", "train.train_iters=1",
         "train.eval_iters=0", "train.log_interval=1", "train.lr_warmup_iters=0",
         "data.heldout_path=null", "data.valid_path=null", "parallel.timeout_minutes=1.0"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Good and broken datasets (the golden one) and checkpoints, all small."""
    from megatron_latentcot.cli.export_hf import export
    from megatron_latentcot.data.indexed import IndexedReader, IndexedWriter
    from megatron_latentcot.data.tokenizer import build_tokenizer
    from megatron_latentcot.inference.loading import load_model

    d = tmp_path_factory.mktemp("cli_errors")
    tok = build_tokenizer("sentencepiece", TOKENIZER)
    with IndexedWriter(d / "good", tok.vocab_size) as w:  # with .meta.json (the tokenizer)
        for doc in IndexedReader(GOLDEN / "sotu_small_text_document").documents():
            w.add_document(doc)
        w.finalize({"tokenizer_fingerprint": tok.fingerprint, "tokenizer_model": str(TOKENIZER),
                    "vocab_size": tok.vocab_size})
    for name in ("corrupt", "truncated"):
        for ext in (".bin", ".idx"):
            shutil.copyfile(d / f"good{ext}", d / f"{name}{ext}")
    with open(d / "corrupt.idx", "r+b") as f:
        f.write(b"JUNK")  # the magic
    with open(d / "truncated.bin", "r+b") as f:
        f.truncate(1000)
    save_world_of_one(d / "run", MODEL, 1024, tok)
    shutil.copytree(d / "run", d / "cut_run")
    rank_file = d / "cut_run" / "iter_0000005" / "rank_00000.pt"
    with open(rank_file, "r+b") as f:
        f.truncate(rank_file.stat().st_size // 2)
    export(load_model(d / "run"), d / "cut_export", "latent")
    with open(d / "cut_export" / "model.safetensors", "r+b") as f:
        f.truncate(300)
    return {"dir": d, "good": d / "good", "corrupt": d / "corrupt", "truncated": d / "truncated",
            "run": d / "run", "cut_run": d / "cut_run", "rank_file": rank_file,
            "cut_export": d / "cut_export"}


def _check(rc: int, err: str, *expected: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (rc, err)
    for text in expected:
        assert text in lines[0], (text, lines[0])


# -- pretrain, one process ----------------------------------------------------------------
def _pretrain(overrides: list[str], env: dict[str, str] | None = None,
              cwd: Path = REPO) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLC_FAULT")}
    return subprocess.Popen([sys.executable, "-m", "megatron_latentcot.pretrain",
                             *MODEL, *TRAIN, *overrides], cwd=cwd, text=True,
                            env={**base, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                 **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


CASES = {  # name: (overrides given the inputs, texts the one line must hold)
    "corrupt_idx": (lambda i: [f"data.data_path=[{i['corrupt']}]"],
                    lambda i: [f"{i['corrupt']}.idx: bad magic", "expected it to start with"]),
    "missing_idx": (lambda i: [f"data.data_path=[{i['dir'] / 'nowhere'}]"],
                    lambda i: [f"{i['dir'] / 'nowhere'}.idx: index file not found"]),
    "truncated_bin": (lambda i: [f"data.data_path=[{i['truncated']}]"],
                      lambda i: [f"{i['truncated']}.bin: data file is 1000 bytes", "truncated"]),
    "other_tokenizer": (lambda i: [f"data.data_path=[{i['good']}]", "model.vocab_size=4096",
                                   f"data.tokenizer_model={i['sp_tokenizer']}"],
                        lambda i: [f"{i['good']}.meta.json: dataset was built with tokenizer"]),
    "truncated_checkpoint": (lambda i: [f"data.data_path=[{i['good']}]",
                                        f"train.load={i['cut_run']}"],
                             lambda i: [f"{i['rank_file']}: checksum mismatch"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pretrain_bad_input_is_one_line_and_exit_2(inputs, sp_tokenizer_path, case):
    i = dict(inputs, sp_tokenizer=sp_tokenizer_path)
    overrides, expected = CASES[case]
    p = _pretrain(overrides(i))
    _, err = p.communicate(timeout=300)
    _check(p.returncode, err, *expected(i))
    assert err.startswith("error: ")


def test_pretrain_bad_input_world_of_two(inputs):
    """Two ranks launched as torchrun starts them (RANK/WORLD_SIZE/MASTER_*): the truncated
    checkpoint is found by the collective load check; each rank prints the one line, exit 2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_pretrain(CASES["truncated_checkpoint"][0](inputs),
                       {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, err in zip(procs, errs):
        _check(p.returncode, err, f"{inputs['rank_file']}: checksum mismatch")


def test_failed_save_while_training_stays_exit_1(inputs, tmp_path):
    """A runtime failure (the save at the end fails) is not bad input: exit 1, one line."""
    p = _pretrain([f"data.data_path=[{inputs['good']}]", f"train.save={tmp_path / 'out'}"],
                  {"MLC_FAULT": "save:before_rename=oserror"})
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1, err
    assert "Traceback" not in err and "error: checkpoint at iteration 1 failed" in err


# -- tools, in process ---------------------------------------------------------------------
def _tool(capsys, tool: str, *args: str) -> tuple[int, str]:
    import importlib

    rc = importlib.import_module(f"megatron_latentcot.cli.{tool}").main([*map(str, args)])
    return rc, capsys.readouterr().err


def test_tools_missing_run_directory(inputs, capsys, tmp_path):
    nope = inputs["dir"] / "no_such_run"
    for tool, extra in (("generate", ["--prompt", "x"]), ("evaluate", []),
                        ("export_hf", [tmp_path / "out"])):
        _check(*_tool(capsys, tool, nope, *extra), f"{nope}: neither a checkpoint directory")


def test_tools_truncated_checkpoint_or_export(inputs, capsys, tmp_path):
    rank_file = f"{inputs['rank_file']}: checksum mismatch (file corrupt or truncated)"
    for tool, extra in (("generate", ["--prompt", "x"]), ("evaluate", []),
                        ("export_hf", [tmp_path / "out"])):
        _check(*_tool(capsys, tool, inputs["cut_run"], *extra), rank_file)
    _check(*_tool(capsys, "generate", inputs["cut_export"], "--prompt", "x"),
           f"{inputs['cut_export'] / 'model.safetensors'}: unreadable weights")


def test_tools_wrong_tokenizer(inputs, capsys, sp_tokenizer_path):
    _check(*_tool(capsys, "generate", inputs["run"], "--prompt", "x", "--tokenizer-model",
                  sp_tokenizer_path),
           f"{sp_tokenizer_path}: not the tokenizer the model was trained with")


def test_evaluate_bad_datasets(inputs, capsys, sp_tokenizer_path):
    run = inputs["run"]
    _check(*_tool(capsys, "evaluate", run, "--data", f"x={inputs['corrupt']}"),
           f"{inputs['corrupt']}.idx: bad magic")
    _check(*_tool(capsys, "evaluate", run, "--data", f"x={inputs['truncated']}"),
           f"{inputs['truncated']}.bin: data file is 1000 bytes")
    _check(*_tool(capsys, "evaluate", run, "--data", f"x={inputs['dir'] / 'nowhere'}"),
           f"{inputs['dir'] / 'nowhere'}.idx: index file not found")
    _check(*_tool(capsys, "evaluate", run, "--jsonl", f"x={inputs['dir'] / 'none.jsonl'}"),
           f"{inputs['dir'] / 'none.jsonl'}")
