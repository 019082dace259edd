"""Pipeline schedules: the order in which each stage runs its units. Pure Python (no torch), so
the pipelines execute it, the planner prices it and tests simulate it without processes.

A unit ``(m, k)`` is micro-batch m at step k on one stage (k = 1 for one-pass models). Under the
latent loop, step k + 1 enters stage 0 from the last stage: unrolled, the ring is a pipeline of
K x PP virtual stages in which stage s hosts virtual stages s, s + PP, ..., s + (K-1) PP, i.e.
Megatron's interleaved schedule with the steps as its model chunks. Two schedules:

* ``gpipe``: every forward (step-major over all micro-batches), then every backward in reverse.
  A stage holds all M micro-batches' graphs at the turn.
* ``1f1b``: forwards in groups of PP micro-batches, step-major within a group; backwards in the
  same groups, steps reversed. Stage s runs ``(PP - s - 1) + (K - 1) PP`` forwards (warm-up),
  then alternates one forward and one backward (steady state), then the remaining backwards
  (cool-down). At most ``K PP - s`` units are alive on stage s: P - s micro-batches for one-pass
  models (K = 1, the standard 1F1B), whatever M.

Every stage derives the same lists, so all agree on which units exist (a halted micro-batch's
later units are no-ops everywhere). Each (kind, direction) of message has its own communicator
(``ParallelContext.p2p_group``: with PP = 2 the wrap-around runs against the ordinary direction
between the same two ranks, which on one NCCL communicator would deadlock); on each, both ends
list their messages in the same order (``check_links``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

SCHEDULES = ("1f1b", "gpipe")

Op = tuple[str, int, int]  # ("F" forward | "B" backward, micro-batch, step)


def forward_order(schedule: str, pp: int, steps: int, micro: int) -> list[tuple[int, int]]:
    """(micro-batch, step) in the order every stage runs their forwards."""
    if schedule == "gpipe":
        return [(m, k) for k in range(1, steps + 1) for m in range(micro)]
    return [(m, k) for g in range(0, micro, pp) for k in range(1, steps + 1)
            for m in range(g, min(g + pp, micro))]


def backward_order(schedule: str, pp: int, steps: int, micro: int) -> list[tuple[int, int]]:
    """(micro-batch, step) in the order every stage runs their backwards."""
    if schedule == "gpipe":
        return [(m, k) for k in range(steps, 0, -1) for m in reversed(range(micro))]
    return [(m, k) for g in range(0, micro, pp) for k in range(steps, 0, -1)
            for m in range(g, min(g + pp, micro))]


def warmup(pp: int, steps: int, stage: int) -> int:
    """1F1B: forwards stage ``stage`` runs before its first backward."""
    return (pp - stage - 1) + (steps - 1) * pp


def stage_ops(schedule: str, pp: int, steps: int, micro: int, stage: int,
              forward_only: bool = False) -> list[Op]:
    """What stage ``stage`` runs, in order."""
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pipeline_schedule: expected one of {SCHEDULES}, got {schedule!r}")
    fwd = [("F", m, k) for m, k in forward_order(schedule, pp, steps, micro)]
    if forward_only:
        return fwd
    bwd = [("B", m, k) for m, k in backward_order(schedule, pp, steps, micro)]
    if schedule == "gpipe":
        return fwd + bwd
    w = min(len(fwd), warmup(pp, steps, stage))
    ops = fwd[:w]
    for f, b in zip(fwd[w:], bwd, strict=False):
        ops += [f, b]
    return ops + bwd[len(fwd) - w:]


# -- who sends what to whom ---------------------------------------------------------------------

def message_to(op: Op, stage: int, pp: int, steps: int) -> tuple[int, Op] | None:
    """The (stage, op) that receives what ``op`` on ``stage`` sends, or None."""
    kind, m, k = op
    if kind == "F":
        if stage < pp - 1:
            return stage + 1, op
        return (0, ("F", m, k + 1)) if k < steps else None
    if stage > 0:
        return stage - 1, op
    return (pp - 1, ("B", m, k - 1)) if k > 1 else None


def message_from(op: Op, stage: int, pp: int, steps: int) -> tuple[int, Op] | None:
    """The (stage, op) whose message ``op`` on ``stage`` receives, or None."""
    kind, m, k = op
    if kind == "F":
        if stage > 0:
            return stage - 1, op
        return (pp - 1, ("F", m, k - 1)) if k > 1 else None
    if stage < pp - 1:
        return stage + 1, op
    return (0, ("B", m, k + 1)) if k < steps else None


class Plan:
    """Every stage's ops and their positions: which of this stage's sends a receipt proves
    consumed (a peer that sent op j has finished every op before j)."""

    def __init__(self, schedule: str, pp: int, steps: int, micro: int, forward_only: bool = False):
        self.pp, self.steps = pp, steps
        self.ops = [stage_ops(schedule, pp, steps, micro, s, forward_only) for s in range(pp)]
        self.index = [{op: i for i, op in enumerate(ops)} for ops in self.ops]

    def consumer(self, op: Op, stage: int) -> tuple[int, int] | None:
        """(peer stage, its op index) that receives ``op``'s message."""
        to = message_to(op, stage, self.pp, self.steps)
        return None if to is None else (to[0], self.index[to[0]][to[1]])

    def producer(self, op: Op, stage: int) -> tuple[int, int] | None:
        """(peer stage, its op index) whose message ``op`` receives."""
        src = message_from(op, stage, self.pp, self.steps)
        return None if src is None else (src[0], self.index[src[0]][src[1]])


# -- simulation ------------------------------------------------------------------------------------

class Deadlock(RuntimeError):
    pass


@dataclass
class Timeline:
    """Start and end of every op per stage, at given forward / backward costs."""

    pp: int
    runs: list[list[tuple[float, float, Op]]]

    @property
    def makespan(self) -> float:
        return max(r[-1][1] for r in self.runs if r)

    def bubble(self) -> float:
        """Idle share of all stages' time until the last op ends."""
        busy = sum(e - s for r in self.runs for s, e, _ in r)
        return 1.0 - busy / (self.pp * self.makespan)


def simulate(schedule: str, pp: int, steps: int, micro: int, forward_cost: float = 1.0,
             backward_cost: float = 2.0) -> Timeline:
    """Run the schedule's data flow (sends never block, receives wait); raises Deadlock."""
    plan = Plan(schedule, pp, steps, micro)
    done: dict[tuple[int, Op], float] = {}
    runs: list[list[tuple[float, float, Op]]] = [[] for _ in range(pp)]
    nxt, free = [0] * pp, [0.0] * pp
    while any(nxt[s] < len(plan.ops[s]) for s in range(pp)):
        progress = False
        for s in range(pp):
            while nxt[s] < len(plan.ops[s]):
                op = plan.ops[s][nxt[s]]
                deps = [message_from(op, s, pp, steps)]
                if s == pp - 1 and op[0] == "B":  # the loss exists once the last step ran
                    deps.append((s, ("F", op[1], steps)))
                deps = [d for d in deps if d is not None]
                if any(d not in done for d in deps):
                    break
                start = max([free[s]] + [done[d] for d in deps])
                end = start + (forward_cost if op[0] == "F" else backward_cost)
                done[(s, op)], free[s] = end, end
                runs[s].append((start, end, op))
                nxt[s] += 1
                progress = True
        if not progress:
            stuck = {s: plan.ops[s][nxt[s]] for s in range(pp) if nxt[s] < len(plan.ops[s])}
            raise Deadlock(f"{schedule} pp={pp} steps={steps} micro={micro}: stuck at {stuck}")
    return Timeline(pp, runs)


def check_links(schedule: str, pp: int, steps: int, micro: int) -> None:
    """Each (sender, receiver, kind) carries its messages in the same order at both ends."""
    plan = Plan(schedule, pp, steps, micro)
    sent: dict[tuple[int, int, str], list] = {}
    got: dict[tuple[int, int, str], list] = {}
    for s, ops in enumerate(plan.ops):
        for op in ops:
            to = message_to(op, s, pp, steps)
            if to is not None:
                sent.setdefault((s, to[0], op[0]), []).append((s, op))
            src = message_from(op, s, pp, steps)
            if src is not None:
                got.setdefault((src[0], s, op[0]), []).append(src)
    if sent != got:
        bad = [key for key in sent.keys() | got.keys() if sent.get(key) != got.get(key)]
        raise Deadlock(f"{schedule} pp={pp} steps={steps} micro={micro}: links {bad} out of order")


def live_units(schedule: str, pp: int, steps: int, micro: int, stage: int) -> list[list[tuple[int, int]]]:
    """The units alive on ``stage`` as each backward starts (a unit lives from its forward to
    the end of its backward); the peak of any per-unit cost is taken over these."""
    alive: set[tuple[int, int]] = set()
    out = []
    for kind, m, k in stage_ops(schedule, pp, steps, micro, stage):
        if kind == "F":
            alive.add((m, k))
        else:
            out.append(sorted(alive))
            alive.discard((m, k))
    return out


def peak_live(schedule: str, pp: int, steps: int, micro: int, stage: int,
              unit_cost: list[float] | None = None,
              micro_cost: float = 0.0) -> tuple[float, int]:
    """(Peak summed cost of the live units, the most micro-batches with a live unit) on
    ``stage``; ``unit_cost[k - 1]``: the cost of a step-k unit (default 1 per unit);
    ``micro_cost``: what a micro-batch holds while any unit of it is live."""
    cost = unit_cost or [1.0] * steps
    best, most = 0.0, 0
    for units in live_units(schedule, pp, steps, micro, stage):
        alive = len({m for m, _ in units})
        best = max(best, sum(cost[k - 1] for _, k in units) + micro_cost * alive)
        most = max(most, alive)
    return best, most


def table(schedule: str, pp: int, steps: int, micro: int) -> str:
    """A markdown table of (stage, time) -> unit at unit costs: ``F m.k`` / ``B m.k``."""
    tl = simulate(schedule, pp, steps, micro, 1.0, 1.0)
    width = int(tl.makespan)
    rows = []
    for s, run in enumerate(tl.runs):
        cells = ["."] * width
        for start, _, (kind, m, k) in run:
            cells[int(start)] = f"{kind}{m}" + (f".{k}" if steps > 1 else "")
        rows.append(f"| {s} | " + " | ".join(cells) + " |")
    head = "| stage \\ t | " + " | ".join(str(t) for t in range(width)) + " |"
    return "\n".join([head, "|" + "---|" * (width + 1)] + rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print a pipeline schedule as a (stage, time) table.")
    p.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--steps", type=int, default=1, help="K (latent steps per micro-batch)")
    p.add_argument("--micro", type=int, default=4, help="micro-batches")
    a = p.parse_args(argv)
    print(table(a.schedule, a.pp, a.steps, a.micro))
    tl = simulate(a.schedule, a.pp, a.steps, a.micro)
    print(f"\nbubble (backward = 2 forwards): {tl.bubble():.3f}")


if __name__ == "__main__":
    main()
