"""Fault handling: exit codes, preemption signals, hung-collective errors, fault injection.

Exit codes of ``python -m megatron_latentcot.pretrain`` (a launch script branches on them):

- ``EXIT_OK`` (0): training finished.
- ``EXIT_FAILURE`` (1): an error (bad checkpoint, full disk, non-finite losses, a failed or
  timed-out collective...); the message says which. Only a failed collective (a lost node) is
  worth an automatic restart from the last checkpoint; the others need a fix first.
- ``EXIT_CONFIG`` (2): the config or launch environment is invalid.
- ``EXIT_REQUEUE`` (3): preempted (SIGTERM or SIGUSR1, e.g. Slurm ``--signal=USR1@120``); a
  checkpoint was saved at the iteration boundary. Requeue with ``train.load`` = ``train.save``.
  Without ``train.save`` nothing can be saved and the code is 128 + the signal (143, 138).
- ``EXIT_HUNG`` (4): the hang watchdog ended a rank that made no progress for longer than
  ``parallel.timeout_minutes`` (plus a grace period) in a phase where a collective could hang.

Nothing here imports megatron-core, so checkpoint code and tests stay light.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fnmatch
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

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
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


# -- hung or failed collectives --------------------------------------------------------------
_COLLECTIVE_MARKERS = ("timed out", "timeout", "connection closed", "connection reset",
                       "pair closure", "broken pipe", "nccl", "gloo", "socket")


def is_collective_failure(e: BaseException) -> bool:
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
