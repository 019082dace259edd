"""The README's commands run as written, and ``examples/quickstart.sh`` runs end to end.

Every fenced block of README.md names its language: ```bash blocks are commands to run, ```text
blocks (printed output, trees) are not. Each ```bash block is run by bash itself with every
program replaced by a recorder (an empty ``PATH`` and a ``command_not_found_handle``), so
quoting, continuations, ``$(...)`` and ``&&`` are bash's own. Each recorded command is then
checked without doing its work: a Python tool or module runs until its own argparse parser has
parsed the README's exact arguments (a patched ``parse_args`` stops it there); ``torchrun`` goes
through torch's parser first; ``pip install`` must name existing extras and pins that satisfy
setup.py; scripts must exist and pass ``bash -n``; a config and overrides must load. A tool may
import only what setup.py installs with the extras the README installed for it, and what a
command writes inside the repository (its output options, defaults included) must be
git-ignored: documented commands never overwrite committed files.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from tests.conftest import missing

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
QUICKSTART = "examples/quickstart.sh"
FIRST_PARTY = {"megatron_latentcot", "tools", "benchmarks", "tests"}
COMMITTED_DIRS = ("examples/", "tools/", "slurm/", "tests/", "benchmarks/", "docs/",
                  "megatron_latentcot/")
# Namespace attributes naming what a tool writes (argparse dests of its output options).
OUTPUT_DESTS = ("output", "output_dir", "output_prefix", "out", "out_dir", "logs", "figures")
FENCE = re.compile(r"^( *)```(\S*)\n(.*?)^\1```$", re.M | re.S)
RECORDER = ('PATH=/nonexistent\n'
            'command_not_found_handle() { printf "%s\\0" "$#" "$@" >> "$MLC_README_RECORD"; }\n')
_PARSE = argparse.ArgumentParser.parse_args


def fenced_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block, indentation of list items removed."""
    out = []
    for m in FENCE.finditer(README.read_text()):
        indent = len(m.group(1))
        out.append((m.group(2), "".join(line[indent:] for line in
                                        m.group(3).splitlines(keepends=True))))
    return out


def record(block: str) -> list[list[str]]:
    """The commands bash would run for ``block``, as argv lists, with nothing executed."""
    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "record"
        rec.write_bytes(b"")
        res = subprocess.run([shutil.which("bash") or "/bin/bash", "-c", RECORDER + block],
                             cwd=REPO, capture_output=True, text=True, timeout=60,
                             env={"MLC_README_RECORD": str(rec), "HOME": tmp})
        assert res.returncode == 0 and not res.stderr, f"bash rejects the block:\n{block}\n{res.stderr}"
        fields = [f.decode() for f in rec.read_bytes().split(b"\0")[:-1]]
    cmds, i = [], 0
    while i < len(fields):
        n = int(fields[i])
        cmds.append(fields[i + 1:i + 1 + n])
        i += n + 1
    return cmds


@functools.cache
def setup_args() -> dict[str, Any]:
    """setup()'s literal keyword arguments (read, not run)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords
            if k.arg in ("install_requires", "extras_require", "entry_points")}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_extras(argv: list[str]) -> set[str]:
    """Extras of the project that a ``pip install -e ".[a,b]"`` command installs."""
    extras = set()
    for prev, arg in zip(argv, argv[1:]):
        if prev == "-e" and (m := re.fullmatch(r"\.(?:\[(.*)\])?", arg)) and m.group(1):
            extras |= {e.strip() for e in m.group(1).split(",")}
    return extras


@functools.cache
def readme_commands() -> list[tuple[str, list[str], frozenset[str]]]:
    """(id, argv, extras installed for it) of every command of every ```bash block: the
    extras of the Quick start's install plus those installed earlier in the same block."""
    blocks = [text for lang, text in fenced_blocks() if lang == "bash"]
    base = {e for cmd in record(blocks[0]) if cmd[:2] == ["pip", "install"] for e in pip_extras(cmd)}
    out = []
    for b, block in enumerate(blocks):
        extras = set(base)
        for c, cmd in enumerate(record(block)):
            if cmd[:2] == ["pip", "install"]:
                extras |= pip_extras(cmd)
            out.append((f"block{b}-{c}-{' '.join(cmd)[:50]}", cmd, frozenset(extras)))
    return out


# -- checking one command without running its work ------------------------------------------
class _Parsed(BaseException):  # BaseException: a tool's `except Exception` must not catch it
    """Raised by the patched ``parse_args`` once a tool's parser accepted its arguments."""


def parse_only(run: Callable[[], object], argv: list[str], monkeypatch: pytest.MonkeyPatch,
               capsys: pytest.CaptureFixture) -> argparse.Namespace:
    """Run a tool's entry point on ``argv`` up to its argparse ``parse_args``; its Namespace."""
    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(_PARSE(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
        m.setattr(sys, "argv", list(argv))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported
                run()
        except _Parsed as done:
            return done.args[0]
        except SystemExit as e:
            pytest.fail(f"`{shlex.join(argv)}` rejects its arguments (exit {e.code}): "
                        f"{capsys.readouterr().err.strip()}")
    pytest.fail(f"`{shlex.join(argv)}` returned without parsing its arguments with argparse")


def third_party_imports(source: Path) -> set[str]:
    """Top-level names of every absolute import in ``source`` (in functions too), not stdlib
    and not this repository's."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - FIRST_PARTY - set(sys.stdlib_module_names)


def check_imports(source: Path, extras: frozenset[str]) -> None:
    """Every third-party import is installed by setup.py's core or one of ``extras``; skips
    (``missing``: skip, or fail under MLC_REQUIRE_ALL=1) when one comes from an extra the README
    installs here but this environment lacks."""
    args = setup_args()
    reqs = list(args["install_requires"]) + [r for e in extras for r in args["extras_require"][e]]
    declared = {_norm(Requirement(r).name) for r in reqs}
    dists = importlib.metadata.packages_distributions()
    for name in sorted(third_party_imports(source)):
        provided = {_norm(d) for d in dists.get(name, [name])}
        assert provided & declared, (
            f"{source.relative_to(REPO)} imports {name!r}, which neither setup.py's "
            f"install_requires nor the extras the README installs for it ({sorted(extras)}) provide")
        if importlib.util.find_spec(name) is None:
            missing(f"{name} (from an extra the README installs for this command) is not installed")


def check_paths(argv: list[str]) -> None:
    """Arguments naming committed files or folders must name existing ones."""
    for arg in argv:
        value = arg.split("=", 1)[-1]
        if value.startswith(COMMITTED_DIRS):
            assert (REPO / value).exists(), f"`{shlex.join(argv)}`: {value} does not exist"


def git_ignored(path: str | Path) -> bool:
    p = Path(path)
    if p.is_absolute() and REPO not in p.parents:
        return True  # outside the repository
    rel = p.relative_to(REPO) if p.is_absolute() else p
    res = [subprocess.run(["git", "check-ignore", "-q", str(q)], cwd=REPO).returncode
           for q in (rel, rel / "_")]  # `/dir/` patterns match only paths inside the folder
    if 128 in res:
        pytest.skip("not a git checkout")
    return 0 in res


def check_namespace(ns: argparse.Namespace, argv: list[str]) -> None:
    """A config and overrides must load; every output must be git-ignored."""
    outputs = [getattr(ns, d) for d in OUTPUT_DESTS if getattr(ns, d, None)]
    if hasattr(ns, "overrides"):
        from megatron_latentcot.config import load_config

        cfg = load_config(getattr(ns, "config", None), ns.overrides)
        if cfg.train.save and not getattr(ns, "print_config", False) and "pretrain" in argv[0]:
            outputs.append(cfg.train.save)
    for out in outputs:
        assert git_ignored(out), f"`{shlex.join(argv)}` writes {out}, which git does not ignore"


def check_python(args: list[str], extras: frozenset[str], monkeypatch, capsys) -> None:
    if args[0] == "-c":
        compile(args[1], "<README: python -c>", "exec")
        return
    if args[:2] == ["-m", "pytest"]:  # pytest's own parser: --version parses all, runs nothing
        assert "pytest" in {_norm(Requirement(r).name) for e in extras
                            for r in setup_args()["extras_require"][e]}
        res = subprocess.run([sys.executable, "-m", "pytest", *args[2:], "--version"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        return
    if args[0] == "-m":
        spec = importlib.util.find_spec(args[1])
        assert spec and spec.origin, f"python -m {args[1]}: no such module"
        source, argv = Path(spec.origin), [spec.origin, *args[2:]]
        run = functools.partial(runpy.run_module, args[1], run_name="__main__", alter_sys=True)
    else:
        source, argv = REPO / args[0], [str(REPO / args[0]), *args[1:]]
        assert source.is_file(), f"python {args[0]}: no such file"
        run = functools.partial(runpy.run_path, str(source), run_name="__main__")
    check_imports(source, extras)
    check_namespace(parse_only(run, argv, monkeypatch, capsys), argv)


def check_script(argv: list[str]) -> None:
    """``bash X.sh ...`` / ``sbatch [opts] X.sh ...``: the script exists and parses; the
    quickstart's config and overrides load (they go to ``pretrain`` as given)."""
    args = [a for a in argv[1:] if not (argv[0] == "sbatch" and a.startswith("-"))]
    script = REPO / args[0]
    assert script.is_file(), f"{args[0]} does not exist"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    if args[0] == QUICKSTART:
        from megatron_latentcot.config import load_config

        cfg = load_config(args[1] if len(args) > 1 else "examples/configs/tiny.yaml", args[2:])
        assert git_ignored(cfg.train.save)


def check_pip(argv: list[str]) -> None:
    """Extras exist; pins of core requirements satisfy setup.py; indexes are https."""
    assert argv[1] == "install"
    core = {_norm(Requirement(r).name): Requirement(r) for r in setup_args()["install_requires"]}
    assert pip_extras(argv) <= set(setup_args()["extras_require"]), argv
    args = iter(argv[2:])
    for arg in args:
        if arg in ("-e", "--index-url"):
            value = next(args)
            assert arg == "-e" or value.startswith("https://"), argv
        elif not arg.startswith("-"):
            req = Requirement(arg)
            for spec in req.specifier:
                if _norm(req.name) in core:
                    assert core[_norm(req.name)].specifier.contains(spec.version), (arg, core)


@pytest.mark.parametrize("cmd_id,argv,extras",
                         [pytest.param(*c, id=c[0]) for c in readme_commands()])
def test_readme_command_accepts_its_arguments(cmd_id, argv, extras, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the README's commands run from the repository root
    check_paths(argv)
    scripts = dict(s.split("=", 1) for s in setup_args()["entry_points"]["console_scripts"])
    if argv[0] == "python":
        check_python(argv[1:], extras, monkeypatch, capsys)
    elif argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        ns = _PARSE(get_args_parser(), argv[1:])
        check_python((["-m"] if ns.module else []) + [ns.training_script, *ns.training_script_args],
                     extras, monkeypatch, capsys)
    elif argv[0] in ("bash", "sbatch"):
        check_script(argv)
    elif argv[0] == "pip":
        check_pip(argv)
    elif argv[0] in scripts:
        module, func = scripts[argv[0]].split(":")
        source = Path(importlib.util.find_spec(module).origin)
        check_imports(source, extras)
        ns = parse_only(lambda: getattr(importlib.import_module(module), func)(), argv,
                        monkeypatch, capsys)
        check_namespace(ns, [module, *argv[1:]])
    else:
        pytest.fail(f"no check for `{argv[0]}` (README: `{shlex.join(argv)}`)")


def test_every_readme_block_says_whether_it_runs():
    """```bash = commands that must run as written; ```text = output or trees. A block with
    no language would be neither checked nor clearly marked."""
    langs = [lang for lang, _ in fenced_blocks()]
    assert langs and set(langs) <= {"bash", "text", "yaml"}, langs


# -- the quickstart itself ------------------------------------------------------------------
TINY_RUN = ["model.num_layers=1", "data.seq_length=64", "train.micro_batch_size=2",
            "train.global_batch_size=2", "train.train_iters=2", "train.log_interval=1",
            "train.eval_iters=1"]


def test_quickstart_runs_end_to_end(tmp_path, corpus_paths):
    """The Quick start's script itself (in a copy of the repository's layout, so its outputs
    stay out of the checkout), on the real corpus with a small training: the five stages,
    the start block, an ETA, the summary, the README table's evaluation, and on a second run
    every cached stage says so."""
    assert any(cmd[:2] == ["bash", QUICKSTART] for cmd in record(
        [t for lang, t in fenced_blocks() if lang == "bash"][0]))
    (tmp_path / "examples").mkdir()
    shutil.copy(REPO / QUICKSTART, tmp_path / QUICKSTART)
    for name in ("examples/configs", "tools", "megatron_latentcot"):
        (tmp_path / name).symlink_to(REPO / name)
    env = dict(os.environ, MLC_EVAL_TOKENS="256", OMP_NUM_THREADS="1")

    def quickstart() -> str:
        res = subprocess.run(["bash", QUICKSTART, "examples/configs/tiny.yaml", *TINY_RUN],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout

    first = quickstart()
    for stage in range(1, 6):
        assert f"== {stage}/5 " in first
    assert "== pretraining: vanilla Llama" in first and "TP1 x PP1 x DP1" in first
    assert re.search(r"iter +2/2 .*\| elapsed \d+:\d\d:\d\d \| ETA 0:00:00", first)
    assert "== done: 2 iterations" in first and "python tools/evaluate.py runs/tiny" in first
    assert "| valid | " in first and "| heldout | " in first  # stage 5's table
    results = tmp_path / "runs/tiny/eval_first_256/results.json"
    assert '"max_tokens": 256' in results.read_text()
    second = quickstart()
    assert second.count("skipped (exists)") >= 4, second  # tokenizer + 3 datasets
    assert "already complete" in second, second  # the finished run is resumed, not retrained


def test_lm_eval_adapter_without_its_extra_names_the_extra(monkeypatch, capsys):
    """Run as the README runs it, without lm-eval installed: one line naming the extra."""
    for name in [m for m in sys.modules if m.split(".")[0] == "lm_eval"] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed (None: import fails)
    monkeypatch.setattr(sys, "argv", ["lm_eval.py", "run"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("megatron_latentcot.eval.lm_eval", run_name="__main__", alter_sys=True)
    assert str(exc.value.code).endswith('needs the eval extra: pip install -e ".[eval]"')
