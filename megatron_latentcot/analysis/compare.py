"""Quality against compute: compare training runs by FLOPs, or tabulate analytic FLOPs per method.

The logic behind ``tools/compare_flops.py`` (command line: :mod:`megatron_latentcot.cli.compare_flops`).

Run mode (the paper's Figure 5 shape)::

    python tools/compare_flops.py --runs runs/tiny runs/tiny_adaptive [--out-dir runs/compare_flops]

reads each run's ``metrics.jsonl`` and checkpoint manifest (``iter_*/manifest.json``: the resolved
config), prints a table (method, parameters, tokens, training FLOPs, final validation / held-out
perplexity, mean latent steps, FLOPs ratio to the vanilla run) and writes it as
``compare_runs.{md,json}`` with ``ppl_vs_flops.png`` and ``loss_vs_flops.png``.

Analytic mode (no runs)::

    python tools/compare_flops.py --analytic [--preset 410M 1.4B 7B | --config X.yaml]
        [--steps-dist 0.2,0.3,0.3,0.2 ...] [--tokens N]

gives, per method, training FLOPs per token from ``megatron_latentcot.flops`` (exact causal and
2-D latent attention pair counts for one full sequence: the model the scheduler and the planner
use), the paper's 6·N·passes convention next to it, and inference FLOPs per generated token,
written to ``flops_table.{md,json}``.

Outputs go to ``--out-dir`` (default ``runs/compare_flops``, git-ignored); the committed
``benchmarks/results/flops_table.*`` were written with ``--analytic --steps-dist 0.2,0.3,0.3,0.2
--steps-dist 0.1,0.1,0.1,0.7 --out-dir benchmarks/results`` (the second distribution: the paper's
~3.4 passes per token). Below the per-method tables: :data:`PAPER_FLOPS` beside our rows.

Conventions (``megatron_latentcot.flops``): a multiply-add is 2 FLOPs; training = 3 x forward
(no activation recompute, no flash-attention score recompute). For the adaptive method,
``--steps-dist p1,...,pK`` is the fraction of tokens whose last step is k (expected counts under
halting independent of position, :func:`megatron_latentcot.flops.latent_counts`). Inference:
:func:`megatron_latentcot.flops.inference_flops_per_token`. Parameters:
:func:`megatron_latentcot.plan.total_params` (the shapes the model creates).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_latentcot import flops, vocab
from megatron_latentcot.config import (
    Config,
    ConfigError,
    LatentConfig,
    ModelConfig,
    MoRConfig,
    config_from_dict,
    load_config,
    mor_base_depth,
    mor_capacities,
)
from megatron_latentcot.plan import total_params

REPO_ROOT = Path(__file__).resolve().parents[2]
# Under runs/ (git-ignored), not benchmarks/results: a user's run must not overwrite committed tables.
DEFAULT_OUT = Path("runs/compare_flops")
PAPER_TOKENS = 50_000 * 256 * 2048  # 50k steps x global batch 256 x seq 2048 (~26.2B)
PAPER_VOCAB = 50304

# Paper-scale Llama shapes (../shared/METHOD.md); vocab 50304 (GPT-NeoX tokenizer, padded).
PRESETS: dict[str, dict[str, Any]] = {
    "410M": {"model": {"num_layers": 24, "hidden_size": 1024, "num_attention_heads": 16,
                       "ffn_hidden_size": 2752}, "seq": 2048},
    "1.4B": {"model": {"num_layers": 24, "hidden_size": 2048, "num_attention_heads": 32,
                       "ffn_hidden_size": 5504}, "seq": 2048},
    "7B": {"model": {"num_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                     "ffn_hidden_size": 11008}, "seq": 4096},
}


@dataclass(frozen=True)
class Baseline:
    """One fixed-compute row of the analytic table: a method at the setup's K (``max_steps``
    None) or at its authors' own K, with what else its FLOPs depend on."""

    method: str
    max_steps: int | None = None
    jacobi: int | None = None  # ponderlm2: Jacobi passes J of the training forward

    def k(self, setup_k: int) -> int:
        return self.max_steps or setup_k

    def label(self, setup_k: int) -> str:
        if self.method == "vanilla":
            return "vanilla"
        if self.method == "mor":
            return f"mor expert N_r={self.k(setup_k)}"
        return f"{self.method} K={self.k(setup_k)}" + (f" J={self.jacobi}" if self.jacobi else "")


# One line per baseline (the adaptive rows follow, one per --steps-dist).
BASELINES: tuple[Baseline, ...] = (
    Baseline("vanilla"),
    Baseline("looped"),
    Baseline("pause"),
    Baseline("pondering"),
    Baseline("latent_fixed"),
    # PonderLM-2 as its authors train it: one latent thought (K = 2), J drawn from {2, 3} per
    # micro-batch (their 8x = 3 + 2 E[J]); our config runs a fixed J (3 by default).
    Baseline("ponderlm2", max_steps=2, jacobi=2),
    Baseline("ponderlm2", max_steps=2, jacobi=3),
    # MoR as its authors train it: N_r = 3 recursions of the middle-cycle block, expert-choice
    # with capacities (1, 2/3, 1/3) (examples/configs/*_mor.yaml).
    Baseline("mor", max_steps=3),
)
# The paper's published training FLOPs (6·N·passes, nominal N, 26.2B tokens; METHOD.md) and the
# rows of this table they correspond to (several: their mean; none: the paper's setting is not a
# row here). One line per figure.
PAPER_FLOPS: tuple[tuple[str, str, float, tuple[str, ...]], ...] = (
    ("1.4B", "vanilla", 2.18e20, ("vanilla",)),
    ("1.4B", "adaptive l_max=3 (~3.4 passes)", 7.47e20, ("adaptive K=4 [0.1,0.1,0.1,0.7]",)),
    ("1.4B", "adaptive, strongest (54.5 avg 0-shot)", 10.84e20, ()),
    ("1.4B", "PonderLM-2 (8x; 52.3 avg 0-shot)", 17.47e20,
     ("ponderlm2 K=2 J=2", "ponderlm2 K=2 J=3")),
    ("410M", "adaptive", 2.27e20, ()),
)


class CompareError(Exception):
    """Unreadable run directory or inconsistent arguments; the message says which and why."""


# -- parameters ----------------------------------------------------------------------------------

def method_config(m: ModelConfig, method: str = "vanilla", max_steps: int = 1) -> Config:
    """Model ``m`` trained by ``method`` at K = ``max_steps`` (MoR: N_r = K, expert-choice at
    the authors' default capacities)."""
    return Config(model=m, latent=LatentConfig(method=method, max_steps=max_steps),
                  mor=MoRConfig(num_recursion=max_steps))


def param_count(m: ModelConfig, vocab: int, method: str = "vanilla", max_steps: int = 1) -> int:
    """The planner's exact parameter count (:func:`megatron_latentcot.plan.total_params`) of
    model ``m`` trained by ``method``: the router (adaptive), the K-1 pause embeddings (pause),
    MoR's physical layers (first, shared block, last) and routers."""
    return total_params(method_config(m, method, max_steps), vocab)


def mor_flops_args(cfg: Config) -> dict[str, Any]:
    """flops.py's MoR arguments of ``cfg`` (the shared block's depth, expert capacities: None
    for token-choice); {} for the other methods."""
    if cfg.latent.method != "mor":
        return {}
    return {"base_depth": mor_base_depth(cfg.model.num_layers, cfg.mor.num_recursion),
            "capacity": mor_capacities(cfg.mor) if cfg.mor.router == "expert" else None}


# -- analytic table ------------------------------------------------------------------------------

def parse_dist(text: str, max_steps: int) -> list[float]:
    """'0.2,0.3,0.3,0.2' -> fractions of tokens whose last step is 1..K (normalised)."""
    try:
        dist = [float(x) for x in text.split(",")]
    except ValueError:
        raise CompareError(f"--steps-dist {text!r}: expected comma-separated numbers") from None
    if len(dist) != max_steps:
        raise CompareError(f"--steps-dist {text!r}: expected {max_steps} fractions (steps 1..K), "
                           f"got {len(dist)}")
    total = sum(dist)
    if any(p < 0 for p in dist) or abs(total - 1.0) > 1e-3:
        raise CompareError(f"--steps-dist {text!r}: expected non-negative fractions summing to 1")
    return [p / total for p in dist]


@dataclass
class Setup:
    """One model to tabulate."""

    name: str
    model: ModelConfig
    vocab: int
    seq: int
    max_steps: int
    ptarget: bool = True  # the adaptive loss (per-step p_target head) is on


def analytic_rows(s: Setup, dists: list[list[float]], tokens: int) -> list[dict[str, Any]]:
    """One row per method (one per distribution for adaptive)."""
    rows = []
    methods: list[tuple[Baseline, str, list[float] | None]] = [
        (b, b.label(s.max_steps), None) for b in BASELINES]
    methods += [(Baseline("adaptive"),
                 f"adaptive K={s.max_steps} [{','.join(f'{p:g}' for p in d)}]", d) for d in dists]
    for b, label, dist in methods:
        method, k = b.method, b.k(s.max_steps)
        if method == "mor" and mor_base_depth(s.model.num_layers, k) < 1:
            continue  # too shallow for a first, a last and a shared block of N_r layers
        mor = mor_flops_args(method_config(s.model, method, k))
        n = param_count(s.model, s.vocab, method, k)
        exact = flops.train_flops_per_token(s.model, s.vocab, flops.method_counts(
            method, s.seq, k, dist, s.ptarget, jacobi=b.jacobi, **mor), s.seq)
        npass = flops.passes_per_token(method, k, dist, jacobi=b.jacobi,
                                       **({"seq": s.seq, **mor} if mor else {}))
        rows.append({"setup": s.name, "method": method, "label": label, "params": n, "K": k,
                     "jacobi": b.jacobi, "passes": npass, "train_flops_per_token": exact,
                     "kaplan_flops_per_token": flops.kaplan_flops_per_token(n, npass),
                     "train_flops_total": exact * tokens,
                     "kaplan_flops_total": flops.kaplan_flops_per_token(n, npass) * tokens,
                     "inference_flops_per_token": flops.inference_flops_per_token(
                         s.model, s.vocab, method, s.seq, k, dist, **mor)})
    base = rows[0]
    for r in rows:
        r["train_ratio"] = r["train_flops_per_token"] / base["train_flops_per_token"]
        r["exact_over_kaplan"] = r["train_flops_per_token"] / r["kaplan_flops_per_token"]
        r["inference_ratio"] = r["inference_flops_per_token"] / base["inference_flops_per_token"]
    return rows


def paper_comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:data:`PAPER_FLOPS` beside this table: for each published figure whose setup was
    tabulated, the mean over its rows of our 6·N·passes and exact totals (None where the
    paper's setting is not a row, e.g. an adaptive distribution not passed by --steps-dist)."""
    out = []
    for setup, what, paper, labels in PAPER_FLOPS:
        if not any(r["setup"] == setup for r in rows):
            continue
        found = [r for label in labels for r in rows if r["setup"] == setup and r["label"] == label]
        ok = bool(labels) and len(found) == len(labels)
        mean = {key: sum(r[key] for r in found) / len(found) if ok else None
                for key in ("passes", "kaplan_flops_total", "train_flops_total")}
        out.append({"setup": setup, "paper": what, "paper_train_flops": paper, "rows": list(labels),
                    **mean, "exact_over_paper": mean["train_flops_total"] / paper if ok else None})
    return out


def _fmt3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _e(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def analytic_markdown(setups: list[Setup], rows: list[dict[str, Any]], tokens: int) -> str:
    lines = ["# Analytic FLOPs per token by method", "",
             "Generated by `tools/compare_flops.py --analytic`. Multiply-add = 2 FLOPs; training = "
             "3 x forward; attention from exact visible (query, key) pairs of a full causal sequence "
             "(adaptive: expected pairs for the given distribution of last steps, halting "
             "independent of position). `6·N·passes`: the paper's convention (N = all parameters, "
             "incl. embeddings). Inference: forward only per generated token, K/V cache, context "
             f"seq/2. Totals at {tokens:.3g} training tokens.", ""]
    if any(r["method"] == "mor" for r in rows):
        lines += ["MoR (expert-choice, capacities (N_r - r + 1) / N_r): N = its physical parameters "
                  "(first and last layer, the shared block, the routers); passes = layers run per "
                  "token over its physical layers; inference at the training capacities' share of "
                  "tokens per recursion (its decoder routes by the threshold rule, so a trained "
                  "model's decoding cost may differ). No published MoR figure in the paper's "
                  "FLOPs list.", ""]
    if any(s.name in PRESETS for s in setups):
        lines += ["Paper (6·N·passes, nominal N, 26.2B tokens): vanilla 1.4B 2.18e20; adaptive 1.4B "
                  "l_max=3 7.47e20 (~3.4 passes); adaptive 410M 2.27e20. The row with last-step "
                  "distribution 0.1,0.1,0.1,0.7 has 3.4 passes/token.", ""]
    for s in setups:
        m = s.model
        n = param_count(m, s.vocab)
        lines += [f"## {s.name}: {m.num_layers} layers, d {m.hidden_size}, {m.num_attention_heads} "
                  f"heads ({m.kv_heads} KV), FFN {m.ffn_hidden_size}, vocab {s.vocab}, seq {s.seq}, "
                  f"K {s.max_steps}; N = {n:.4g}", "",
                  "| method | passes/token | train FLOPs/token | x vanilla | 6·N·passes | exact / 6N·p "
                  "| train FLOPs total | 6·N·passes total | inference FLOPs/token | x vanilla |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["setup"] == s.name):
            lines.append(
                f"| {r['label']} | {r['passes']:.2f} | {_e(r['train_flops_per_token'])} | "
                f"{r['train_ratio']:.2f} | {_e(r['kaplan_flops_per_token'])} | "
                f"{r['exact_over_kaplan']:.3f} | {_e(r['train_flops_total'])} | "
                f"{_e(r['kaplan_flops_total'])} | {_e(r['inference_flops_per_token'])} | "
                f"{r['inference_ratio']:.2f} |")
        lines.append("")
    paper = paper_comparison(rows)
    if paper:
        lines += ["## Beside the paper's published training FLOPs", "",
                  "The paper's figure (6·N·passes with nominal N) and the rows above it corresponds "
                  "to (their mean: PonderLM-2's authors draw J uniformly from {2, 3}; `n/a`: the "
                  "paper's setting is not a row here). `exact / paper`: our exact count over the "
                  "published figure.", "",
                  "| setup | paper | paper train FLOPs | our rows | passes/token | 6·N·passes "
                  "total | exact total | exact / paper |", "|---|---|---:|---|---:|---:|---:|---:|"]
        for r in paper:
            lines.append(f"| {r['setup']} | {r['paper']} | {_e(r['paper_train_flops'])} | "
                         f"{', '.join(r['rows']) or 'n/a'} | {_e(r['passes'])} | "
                         f"{_e(r['kaplan_flops_total'])} | {_e(r['train_flops_total'])} | "
                         f"{_fmt3(r['exact_over_paper'])} |")
        lines.append("")
    return "\n".join(lines)


# -- vocabulary ----------------------------------------------------------------------------------

def resolve_vocab(cfg: Config, override: int | None, base: Path | None = None) -> int:
    """Embedding rows: ``--vocab``, else ``model.vocab_size``, else the tokenizer (looked up
    under ``base``, then the repository) padded as training pads it (:mod:`~megatron_latentcot.vocab`,
    which does not import megatron-core: it is slow to import)."""
    try:
        return vocab.resolve_vocab(cfg, cfg.parallel.tensor_model_parallel_size, override,
                                   bases=(base, REPO_ROOT), flag="--vocab")
    except ConfigError as e:
        raise CompareError(f"vocabulary size unknown: {e}") from None


# -- runs ------------------------------------------------------------------------------------------

@dataclass
class Run:
    name: str
    path: Path
    cfg: Config
    vocab: int | None
    train: list[dict[str, Any]]
    valid: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    manifest: dict[str, Any]

    def flops_at(self, iteration: float) -> float:
        """Cumulative training FLOPs at ``iteration`` (linear between logged iterations)."""
        xs = [0.0] + [float(r["iteration"]) for r in self.train if "train_flops" in r]
        ys = [0.0] + [float(r["train_flops"]) for r in self.train if "train_flops" in r]
        if iteration >= xs[-1]:
            return ys[-1]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if x0 <= iteration <= x1:
                return y0 + (y1 - y0) * (iteration - x0) / max(x1 - x0, 1e-12)
        return 0.0


def read_metrics(path: Path) -> dict[str, list[dict[str, Any]]]:
    """metrics.jsonl -> {split: records sorted by iteration}; the last record of a repeated
    (split, iteration) wins (a resumed run appends to the same file)."""
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            by_key[(str(rec["split"]), int(rec["iteration"]))] = rec
        except (ValueError, KeyError, TypeError) as e:
            raise CompareError(f"{path}:{n}: not a metrics record ({e})") from None
    out: dict[str, list[dict[str, Any]]] = {}
    for (split, _), rec in sorted(by_key.items(), key=lambda kv: kv[0][1]):
        out.setdefault(split, []).append(rec)
    return out


def find_manifest(run_dir: Path) -> Path:
    """The manifest of ``latest``, else of the highest ``iter_*`` that has one."""
    latest = run_dir / "latest"
    if latest.is_file():
        cand = run_dir / latest.read_text().strip() / "manifest.json"
        if cand.is_file():
            return cand
    found = sorted(run_dir.glob("iter_*/manifest.json"))
    if not found:
        raise CompareError(f"{run_dir}: no iter_*/manifest.json (the run's config is needed)")
    return found[-1]


def load_run(run_dir: Path, vocab: int | None = None) -> Run:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise CompareError(f"{run_dir}: no metrics.jsonl")
    manifest = json.loads(find_manifest(run_dir).read_text())
    cfg = config_from_dict(manifest.get("config"), source=f"{run_dir} manifest config")
    try:
        v: int | None = resolve_vocab(cfg, vocab, base=run_dir)
    except CompareError as e:
        print(f"warning: {run_dir}: {e}; parameters not reported", file=sys.stderr)
        v = None
    splits = read_metrics(metrics)
    return Run(run_dir.name, run_dir, cfg, v, splits.get("train", []), splits.get("valid", []),
               splits.get("heldout", []), manifest)


def run_row(run: Run) -> dict[str, Any]:
    lat = run.cfg.latent
    k = 1 if lat.method == "vanilla" else lat.max_steps
    last = run.train[-1] if run.train else {}
    flops = last.get("train_flops", run.manifest.get("train_flops"))
    tokens = last.get("consumed_tokens", run.manifest.get("consumed_tokens"))
    steps = [r["mean_steps"] for r in run.train if "mean_steps" in r]
    return {"run": run.name, "path": str(run.path), "method": lat.method, "max_steps": k,
            "params": total_params(run.cfg, run.vocab) if run.vocab else None,
            "tokens": tokens, "train_flops": flops,
            "flops_per_token": flops / tokens if flops and tokens else None,
            "valid_ppl": run.valid[-1]["ppl"] if run.valid else None,
            "heldout_ppl": run.heldout[-1]["ppl"] if run.heldout else None,
            "mean_steps": sum(steps) / len(steps) if steps else None,
            "final_iteration": last.get("iteration")}


def runs_markdown(rows: list[dict[str, Any]], reference: str | None = None) -> str:
    def f(x: Any, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    lines = ["| run | method | K | parameters | tokens | training FLOPs | FLOPs/token | valid PPL "
             f"| held-out PPL | mean steps | FLOPs x {reference or 'reference'} |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['method']} | {r['max_steps']} | {f(r['params'], ',')} | "
                     f"{f(r['tokens'], ',')} | {f(r['train_flops'], '.4g')} | "
                     f"{f(r['flops_per_token'], '.4g')} | {f(r['valid_ppl'], '.2f')} | "
                     f"{f(r['heldout_ppl'], '.2f')} | {f(r['mean_steps'], '.2f')} | "
                     f"{f(r['flops_ratio'], '.2f')} |")
    return "\n".join(lines) + "\n"


def curves(run: Run) -> dict[str, list[list[float]]]:
    """[cumulative training FLOPs, value] per logged point: train loss, valid/held-out PPL and loss."""
    out = {"train_loss": [[float(r["train_flops"]), float(r["lm_loss"])] for r in run.train
                          if "train_flops" in r and "lm_loss" in r]}
    for split, recs in (("valid", run.valid), ("heldout", run.heldout)):
        out[f"{split}_ppl"] = [[run.flops_at(r["iteration"]), float(r["ppl"])] for r in recs]
        out[f"{split}_loss"] = [[run.flops_at(r["iteration"]), float(r["loss"])] for r in recs]
    return out


def _flops_axis(ax: Any) -> None:
    """Training FLOPs on x: log scale when the runs span more than a decade, else linear."""
    from matplotlib.ticker import NullFormatter

    xs = [x for line in ax.get_lines() for x in line.get_xdata() if x > 0]
    if xs and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    ax.set_xlabel("training FLOPs")


def _finish_axis(ax: Any, ylabel: str, title: str) -> None:
    _flops_axis(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Lay out, write and close ``fig`` (closing frees it: the study draws many)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_runs(rows: list[dict[str, Any]], all_curves: dict[str, dict[str, list[list[float]]]],
              out_dir: Path) -> list[Path]:
    """ppl_vs_flops.png (validation / held-out PPL vs training FLOPs) and loss_vs_flops.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no PNGs written", file=sys.stderr)
        return []
    written = []
    has_heldout = any(all_curves[r["run"]]["heldout_ppl"] for r in rows)
    fig, axes = plt.subplots(1, 2 if has_heldout else 1, figsize=(11 if has_heldout else 6, 4.5),
                             squeeze=False)
    for ax, split in zip(axes[0], ("valid", "heldout")):
        for r in rows:
            pts = all_curves[r["run"]][f"{split}_ppl"]
            if not pts:
                continue
            xs, ys = zip(*pts)
            (line,) = ax.plot(xs, ys, marker="o", ms=3, alpha=0.6, label=f"{r['run']} ({r['method']})")
            ax.plot(xs[-1], ys[-1], marker="*", ms=14, color=line.get_color())
        _finish_axis(ax, f"{'validation' if split == 'valid' else 'held-out'} perplexity",
                     f"{'Validation' if split == 'valid' else 'Held-out'} PPL vs training compute")
    written.append(save_figure(fig, out_dir / "ppl_vs_flops.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        c = all_curves[r["run"]]
        color = None
        if c["train_loss"]:
            xs, ys = zip(*c["train_loss"])
            (line,) = ax.plot(xs, ys, label=f"{r['run']} train ({r['method']})")
            color = line.get_color()
        if c["valid_loss"]:
            xs, ys = zip(*c["valid_loss"])
            ax.plot(xs, ys, ls="--", marker="o", ms=4, color=color, label=f"{r['run']} valid")
    _finish_axis(ax, "LM loss (nats)", "Loss vs training compute")
    written.append(save_figure(fig, out_dir / "loss_vs_flops.png"))
    return written


def compare_runs(dirs: list[Path], out_dir: Path, vocab: int | None = None,
                 reference: str | None = None) -> list[dict[str, Any]]:
    """Table and curves of training runs; FLOPs ratios are against ``reference`` (a run name),
    by default the vanilla run with the fewest training FLOPs."""
    runs = [load_run(d, vocab) for d in dirs]
    names = [r.name for r in runs]
    for r in runs:  # disambiguate equal directory names
        if names.count(r.name) > 1:
            r.name = str(r.path)
    rows = [run_row(r) for r in runs]
    if reference is not None:
        ref = next((r for r in rows if r["run"] == reference), None)
        if ref is None or not ref["train_flops"]:
            raise CompareError(f"--reference {reference}: expected one of the runs with "
                               f"training FLOPs: "
                               f"{', '.join(r['run'] for r in rows if r['train_flops'])}")
    else:
        ref = min((r for r in rows if r["method"] == "vanilla" and r["train_flops"]),
                  key=lambda r: r["train_flops"], default=None)
    for r in rows:
        r["flops_ratio"] = (r["train_flops"] / ref["train_flops"]
                            if ref and r["train_flops"] is not None else None)
    all_curves = {r.name: curves(r) for r in runs}
    out_dir.mkdir(parents=True, exist_ok=True)
    md = runs_markdown(rows, ref["run"] if ref else None)
    print(md)
    (out_dir / "compare_runs.md").write_text("# Runs compared by training compute\n\n" + md)
    (out_dir / "compare_runs.json").write_text(json.dumps({"rows": rows, "curves": all_curves},
                                                          indent=2) + "\n")
    for p in plot_runs(rows, all_curves, out_dir):
        print(f"wrote {p}")
    return rows


def analytic_setups(config: str | None = None, overrides: list[str] | None = None,
                    presets: list[str] | None = None, vocab: int | None = None,
                    max_steps: int | None = None) -> list[Setup]:
    """The models to tabulate: ``config`` (with ``overrides``) and ``presets`` (default: every
    preset unless a config is given)."""
    setups = []
    if config:
        cfg = load_config(config, overrides or [])
        k = max_steps or cfg.latent.max_steps
        setups.append(Setup(Path(config).stem, cfg.model, resolve_vocab(cfg, vocab),
                            cfg.data.seq_length, k, cfg.latent.adaptive_loss_weight > 0))
    for name in presets or ([] if config else list(PRESETS)):
        p = PRESETS[name]
        m = ModelConfig(**p["model"], max_position_embeddings=p["seq"], vocab_size=PAPER_VOCAB)
        setups.append(Setup(name, m, vocab or PAPER_VOCAB, p["seq"], max_steps or 4))
    return setups


def write_analytic(setups: list[Setup], dists: list[str] | None, tokens: int,
                   out_dir: Path) -> list[dict[str, Any]]:
    """``flops_table.{md,json}`` in ``out_dir``: one row per method, one adaptive row per
    ``--steps-dist`` text (default: uniform over 1..K); prints the markdown."""
    rows = []
    for s in setups:
        texts = dists or [",".join([f"{1 / s.max_steps:g}"] * s.max_steps)]
        rows += analytic_rows(s, [parse_dist(t, s.max_steps) for t in texts], tokens)
    md = analytic_markdown(setups, rows, tokens)
    print(md)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "flops_table.md").write_text(md)
    (out_dir / "flops_table.json").write_text(json.dumps(
        {"tokens": tokens, "rows": rows, "paper": paper_comparison(rows)}, indent=2) + "\n")
    return rows
