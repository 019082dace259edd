"""Fault handling: exit codes, preemption signals, hung-collective errors, fault injection.

Exit codes of ``python -m megatron_latentcot.pretrain`` (a launch script branches on them):

- ``EXIT_OK`` (0): training finished.
- ``EXIT_FAILURE`` (1): a failure while training (a failed save or full disk, non-finite losses,
  a failed or timed-out collective...); the message says which. Only a failed collective (a lost
  node) is worth an automatic restart from the last checkpoint; the others need a fix first.
- ``EXIT_CONFIG`` (2): bad input, found before training starts: the config, the launch
  environment, the data (a missing or corrupt ``.idx``/``.bin``, another tokenizer's dataset),
  the tokenizer, or the checkpoint to load (missing, truncated, another model's). One line names
  the file and what was expected (:func:`exits_on_input_error`); retrying cannot help.
- ``EXIT_REQUEUE`` (3): preempted (SIGTERM or SIGUSR1, e.g. Slurm ``--signal=USR1@120``); a
  checkpoint was saved at the iteration boundary. Requeue with ``train.load`` = ``train.save``.
  Without ``train.save`` nothing can be saved and the code is 128 + the signal (143, 138).
- ``EXIT_HUNG`` (4): the hang watchdog ended a rank that made no progress for longer than
  ``parallel.timeout_minutes`` (plus a grace period) in a phase where a collective could hang.

Nothing here imports torch or megatron-core at import time, so command-line tools can use
:func:`exits_on_input_error` and still answer ``--help`` at once.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fnmatch
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec

if TYPE_CHECKING:
    import torch

P = ParamSpec("P")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_REQUEUE = 3
EXIT_HUNG = 4

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
FAULT_ENV = "MLC_FAULT"


class TrainingHalted(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite iterations in a row)."""


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the rank and the operation."""


# -- bad input: one line and EXIT_CONFIG, no traceback ---------------------------------------
# (module, class, label): the project's errors that mean "the input is wrong". Checked through
# sys.modules: an error of a module never imported cannot have been raised, and this module
# stays free of those (heavy) imports. A CheckpointError while training (a failed save) is a
# runtime failure: pretrain.py catches it first (EXIT_FAILURE).
INPUT_ERRORS = (
    ("megatron_latentcot.config", "ConfigError", "config error"),
    ("megatron_latentcot.parallel", "LaunchError", "launch error"),
    ("megatron_latentcot.data.tokenizer", "TokenizerError", "error"),
    ("megatron_latentcot.data.corpus", "CorpusError", "error"),
    ("megatron_latentcot.data.indexed", "IndexedDatasetError", "error"),
    ("megatron_latentcot.data.dataset", "DatasetError", "error"),
    ("megatron_latentcot.training.checkpoint", "CheckpointError", "error"),
    ("megatron_latentcot.inference.loading", "LoadError", "error"),
)


def input_error_label(e: BaseException) -> str | None:
    """``"config error"``, ``"launch error"`` or ``"error"`` when ``e`` is bad input, else None."""
    for module, name, label in INPUT_ERRORS:
        mod = sys.modules.get(module)
        if mod is not None and isinstance(e, getattr(mod, name)):
            return label
    return None


def exits_on_input_error(main: Callable[P, int]) -> Callable[P, int]:
    """Wrap a command-line ``main``: bad input prints one line and returns ``EXIT_CONFIG``.

    Bad input (:data:`INPUT_ERRORS`, and a missing file a tool was pointed at) is the user's to
    fix; a traceback only buries the line that says what to fix. Every other exception still
    raises with its traceback: that is a bug or a runtime failure.
    """
    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except Exception as e:
            label = input_error_label(e) or ("error" if isinstance(e, FileNotFoundError) else None)
            if label is None:
                raise
            text = " ".join(line.strip() for line in str(e).strip().splitlines())
            print(f"{label}: {text or type(e).__name__}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
    return wrapper


# -- preemption ----------------------------------------------------------------------------
class PreemptionHandler:
    """Records SIGTERM/SIGUSR1; ``requested`` makes every rank agree at an iteration boundary.

    A handler only sets a flag: the trainer saves at the next boundary and exits with
    ``EXIT_REQUEUE``. The flag is all-reduced (max) over all ranks, so a signal delivered to
    one rank only stops them all at the same iteration and none waits in a collective.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for s in PREEMPTION_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def requested(self, world_size: int, device: torch.device) -> int | None:
        """The signal number if any rank received one (collective when world_size > 1)."""
        if world_size == 1:
            return self.signum
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


# -- hung or failed collectives --------------------------------------------------------------
_COLLECTIVE_MARKERS = ("timed out", "timeout", "connection closed", "connection reset",
                       "pair closure", "broken pipe", "nccl", "gloo", "socket")


def is_collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _COLLECTIVE_MARKERS)


class CollectiveGuard:
    """Names the phase a rank is in, so a failed collective says where it failed.

    ``phase(name)`` translates a torch.distributed failure inside it (gloo/NCCL raise after
    the process-group timeout) into a :class:`CollectiveError` naming the rank and ``name``.
    A watchdog thread backs this up for hangs that never raise (e.g. NCCL without async error
    handling): a rank stuck in one phase for ``timeout_s + grace_s`` dumps every thread's
    stack and exits with ``EXIT_HUNG``.
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float, grace_s: float = 60.0,
                 coords: str = ""):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.coords = coords
        self.limit_s = timeout_s + max(grace_s, 0.5 * timeout_s)
        self.current: str | None = None
        self._since = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.world_size > 1 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="mlc-hang-watchdog",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.limit_s / 4)):
            phase, since = self.current, self._since
            if phase is not None and time.monotonic() - since > self.limit_s:
                print(f"rank {self.rank}{self.coords}: no progress in '{phase}' for "
                      f"{time.monotonic() - since:.0f} s (parallel.timeout_minutes = "
                      f"{self.timeout_s / 60:g}); a collective is hung. Stacks follow; exiting "
                      f"with code {EXIT_HUNG}.", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                os._exit(EXIT_HUNG)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        outer, outer_since = self.current, self._since
        self.current, self._since = name, time.monotonic()
        try:
            yield
        except CollectiveError:
            raise
        except Exception as e:
            if self.world_size > 1 and is_collective_failure(e):
                waited = time.monotonic() - self._since
                raise CollectiveError(
                    f"rank {self.rank}{self.coords}: collective in '{name}' failed after "
                    f"{waited:.1f} s (parallel.timeout_minutes = {self.timeout_s / 60:g}, i.e. "
                    f"{self.timeout_s:g} s): {str(e).strip().splitlines()[0]}. Another rank "
                    "probably died, hung or skipped this operation; see its log.") from e
            raise
        finally:
            self.current, self._since = outer, outer_since if outer is not None else 0.0


# -- fault injection (tests and benchmarks/chaos.py) -------------------------------------------
def fault_point(name: str, **info: Any) -> None:
    """A named point where ``$MLC_FAULT`` can inject a fault; a no-op when it is unset.

    ``MLC_FAULT`` holds comma-separated ``PATTERN[@RANK]=ACTION`` items; PATTERN is an
    fnmatch pattern over point names (``save:*``), ACTION one of ``kill`` (SIGKILL this
    process), ``sleep:SECONDS`` or ``oserror`` (raise ENOSPC). Each firing prints a
    ``[fault]`` line to stderr first, so a harness can kill exactly there.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    rank = int(os.environ.get("RANK", "0"))
    for item in spec.split(","):
        target, _, action = item.strip().partition("=")
        pattern, _, only_rank = target.partition("@")
        if not fnmatch.fnmatchcase(name, pattern) or (only_rank and int(only_rank) != rank):
            continue
        details = " ".join(f"{k}={v}" for k, v in info.items())
        print(f"[fault] rank {rank} at {name} {details}: {action}", file=sys.stderr, flush=True)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("sleep:"):
            time.sleep(float(action.split(":", 1)[1]))
        elif action == "oserror":
            raise OSError(28, f"No space left on device (injected at {name})")
        else:
            raise ValueError(f"{FAULT_ENV}: unknown action {action!r} in {item!r}")
