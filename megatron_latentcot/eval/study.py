"""Per-token analyses of the small-scale reproduction study (``tools/reproduce_study.py``).

Three questions, each answered from per-token arrays of a fixed evaluation stream (the same
tokens for every model, so arrays of different models line up):

- **Readouts per step** (:func:`step_readouts`): ``p_target^(k)``, the probability of the true
  next token read out by the LM head after step k (softmax(LMHead(final_norm(h^(k))))[target]),
  next to the final prediction's loss and the passes run. Per method, step k is: the k-th
  latent step (``vanilla``/``adaptive``/``latent_fixed``: ``z^(k)``, the fed-back state; NaN where
  the token had halted), the k-th repeat of the layer stack (``looped``: a "logit lens" on an
  intermediate repeat, which the training loss never reads), the k-th pass (``pondering``) or the
  slot after k-1 pauses (``pause``). The last readout of ``looped``/``latent_fixed``/``pondering``/
  ``pause`` is the model's prediction; ``adaptive`` predicts from the exit-weighted mix ``z^f``.
- **Gain of one more step** against the current ``p_target`` (:func:`gain_curve`,
  the shape of the paper's Figure 2): tokens binned by ``p_target^(k)``, mean of
  ``p_target^(k+1) - p_target^(k)`` per bin. Binning on a noisy quantity and differencing gives a
  falling curve even without any real effect (regression to the mean): compare with the same
  curve between two independently trained models (:func:`gain_curve` on two seeds), or bin by an
  independent model's ``p_target`` instead (``by=``).
- **Steps against difficulty** (:func:`steps_vs_difficulty`): Spearman correlation between the
  passes an adaptive model spends on a token and a reference model's loss on it (a vanilla
  model: "are hard tokens given more steps?"), with a 95% interval from a bootstrap over rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# p_target bin edges for the gain curves (narrow at the low end, where most tokens sit).
GAIN_BINS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


# -- the evaluation stream ------------------------------------------------------------------

def stream_rows(docs: Sequence[Sequence[int]], eod: int, rows: int,
                seq: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``rows * seq`` predictions of ``[EOD] + doc_1 + [EOD] + doc_2 ...`` cut into
    rows like training samples: inputs ``[rows, seq]`` and next-token labels ``[rows, seq]``.
    Raises ValueError when the documents are too short."""
    need = rows * seq + 1
    stream: list[int] = []
    for doc in docs:
        stream.append(eod)
        stream.extend(int(t) for t in doc)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"{len(stream)} tokens in the documents; {need} needed for "
                         f"{rows} rows of {seq}")
    arr = np.asarray(stream[:need], dtype=np.int64)
    idx = np.arange(rows)[:, None] * seq + np.arange(seq)[None, :]
    return arr[idx], arr[idx + 1]


# -- readouts per step ------------------------------------------------------------------------

@dataclass
class Readouts:
    tokens: np.ndarray  # [R, T] inputs
    labels: np.ndarray  # [R, T] next tokens
    nll: np.ndarray  # [R, T] -log p(label) of the model's prediction (nats)
    steps: np.ndarray  # [R, T] passes run at the position (latent steps incl. the token pass)
    p_target: np.ndarray  # [R, T, K] p(label) read out after step k; NaN where not run

    def to_npz(self) -> dict[str, np.ndarray]:
        """Compact arrays for ``np.savez_compressed`` (float16 probabilities and losses)."""
        out = {"tokens": self.tokens.astype(np.uint16), "labels": self.labels.astype(np.uint16),
               "nll": self.nll.astype(np.float16), "steps": self.steps.astype(np.uint8)}
        if self.p_target.shape[-1] > 1:  # K = 1: p_target = exp(-nll)
            out["p_target"] = self.p_target.astype(np.float16)
        return out

    @classmethod
    def from_npz(cls, data: Any) -> Readouts:
        nll = np.asarray(data["nll"], dtype=np.float64)
        p = (np.asarray(data["p_target"], dtype=np.float64) if "p_target" in data
             else np.exp(-nll)[..., None])
        return cls(np.asarray(data["tokens"], dtype=np.int64),
                   np.asarray(data["labels"], dtype=np.int64), nll,
                   np.asarray(data["steps"], dtype=np.int64), p)


def step_readouts(model, tokens: np.ndarray, labels: np.ndarray,
                  batch_rows: int = 16) -> Readouts:
    """Run the training forward of ``model`` (a LoadedModel) on ``tokens`` and read
    ``p_target`` out after every step (see the module docstring), in batches of rows."""
    import torch

    from megatron_latentcot.inference.decoder import training_forward

    stage, scheduler = model.stage, model.scheduler
    method, k_max = model.method, scheduler.max_steps
    kind = "token" if k_max == 1 else method
    nll_all, steps_all, p_all = [], [], []
    for start in range(0, tokens.shape[0], batch_rows):
        tok = torch.as_tensor(tokens[start:start + batch_rows], dtype=torch.long, device=model.device)
        lab = torch.as_tensor(labels[start:start + batch_rows], dtype=torch.long, device=model.device)
        rows, seq = tok.shape
        n = rows * seq
        seen: list[torch.Tensor] = []
        # Instance attributes shadow the methods for this call only (as training_forward does).
        if kind == "looped":  # the output of every repeat of the layer stack
            run_layers = stage.run_layers

            def capture_layers(*args, _orig=run_layers, _seen=seen, **kwargs):
                out = _orig(*args, **kwargs)
                _seen.append(out[0])
                return out

            stage.run_layers, patched = capture_layers, "run_layers"
        else:  # every final-norm output: z^(k) per latent step / pass, or all pause slots
            final_norm = stage.final_norm

            def capture_norm(x, _orig=final_norm, _seen=seen):
                z = _orig(x)
                _seen.append(z)
                return z

            stage.final_norm, patched = capture_norm, "final_norm"
        try:
            with torch.no_grad():
                tf = training_forward(scheduler, tok, lab)
        finally:
            delattr(stage, patched)
        with torch.no_grad():
            flat = lab.reshape(-1)
            logp = torch.log_softmax(tf.logits.reshape(n, -1).double(), dim=-1)
            nll = -logp[torch.arange(n), flat]
            steps = tf.steps.reshape(-1)
            p = torch.full((n, k_max), float("nan"), dtype=torch.float64)
            if kind == "looped":
                states = [stage.final_norm(h) for h in seen]
                slots = [torch.arange(n)] * len(states)
            elif kind in ("pause", "ponderlm2"):  # all K slots of every token in one call
                z = seen[-1] if kind == "ponderlm2" else seen[0]  # ponderlm2: its final pass
                if kind == "pause" and len(seen) != 1:
                    raise RuntimeError(f"pause: {len(seen)} final-norm calls, expected 1")
                z = z.view(n, k_max, 1, z.shape[-1])
                states = [z[:, j] for j in range(k_max)]
                slots = [torch.arange(n)] * k_max
            elif kind == "pondering":
                states, slots = seen, [torch.arange(n)] * len(seen)
            else:  # latent loop: step k ran the slots whose last step is >= k, in slot order
                states = seen
                slots = [torch.nonzero(steps >= k + 1).view(-1) for k in range(len(seen))]
                for k, (z, s) in enumerate(zip(states, slots), start=1):
                    if z.shape[0] != s.numel():
                        raise RuntimeError(f"step {k}: {z.shape[0]} captured states for "
                                           f"{s.numel()} tokens with >= {k} steps")
            if len(states) != k_max and kind != "token" and method not in (
                    "adaptive", "vanilla"):
                raise RuntimeError(f"{method}: captured {len(states)} steps, expected {k_max}")
            for k, (z, s) in enumerate(zip(states, slots)):
                if s.numel() == 0:
                    continue
                lp = torch.log_softmax(stage.logits(z).reshape(s.numel(), -1).double(), dim=-1)
                p[s, k] = lp[torch.arange(s.numel()), flat[s]].exp()
        nll_all.append(nll.view(rows, seq).cpu().numpy())
        steps_all.append(steps.view(rows, seq).cpu().numpy())
        p_all.append(p.view(rows, seq, k_max).cpu().numpy())
    return Readouts(np.asarray(tokens), np.asarray(labels), np.concatenate(nll_all),
                    np.concatenate(steps_all), np.concatenate(p_all))


# -- gain of one more step (Figure 2 shape) --------------------------------------------------

def gain_curve(p_from: np.ndarray, p_to: np.ndarray, bins: Sequence[float] = GAIN_BINS,
               by: np.ndarray | None = None) -> dict[str, list]:
    """Tokens binned by ``p_from`` (or by ``by``, e.g. an independent model's p_target, which
    removes the regression-to-the-mean slope); per bin: count, mean binning value, mean gain
    ``p_to - p_from``, its standard error, and the fraction of tokens whose ``p_target`` fell.
    Tokens with a NaN (a step not run) are left out. The last bin includes its upper edge."""
    a, b = np.asarray(p_from, dtype=np.float64).ravel(), np.asarray(p_to, dtype=np.float64).ravel()
    x = a if by is None else np.asarray(by, dtype=np.float64).ravel()
    if not a.shape == b.shape == x.shape:
        raise ValueError(f"p_from {a.shape}, p_to {b.shape} and by {x.shape}: expected one size")
    ok = np.isfinite(a) & np.isfinite(b) & np.isfinite(x)
    a, b, x = a[ok], b[ok], x[ok]
    edges = np.asarray(bins, dtype=np.float64)
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    out: dict[str, list] = {"lo": edges[:-1].tolist(), "hi": edges[1:].tolist(), "count": [],
                            "mean_p": [], "mean_gain": [], "sem": [], "frac_down": []}
    for i in range(len(edges) - 1):
        g, pa = b[which == i] - a[which == i], x[which == i]
        out["count"].append(int(g.size))
        out["mean_p"].append(float(pa.mean()) if g.size else None)
        out["mean_gain"].append(float(g.mean()) if g.size else None)
        out["sem"].append(float(g.std(ddof=1) / math.sqrt(g.size)) if g.size > 1 else None)
        out["frac_down"].append(float((g < 0).mean()) if g.size else None)
    out["total"] = int(a.size)
    out["overall_gain"] = float((b - a).mean()) if a.size else None
    return out


def step_gain_curves(p_target: np.ndarray, bins: Sequence[float] = GAIN_BINS,
                     by: np.ndarray | None = None) -> dict[str, Any]:
    """:func:`gain_curve` for every transition k -> k+1 of ``p_target [..., K]`` and pooled over
    transitions (each token counted once per transition it ran); binned by the current
    ``p_target^(k)``, or by ``by [...]`` (one value per token) when given."""
    p = np.asarray(p_target, dtype=np.float64).reshape(-1, p_target.shape[-1])
    k_max = p.shape[1]
    x = None if by is None else np.asarray(by, dtype=np.float64).reshape(-1)
    out: dict[str, Any] = {"transitions": {}}
    for k in range(k_max - 1):
        out["transitions"][f"{k + 1}->{k + 2}"] = gain_curve(p[:, k], p[:, k + 1], bins, by=x)
    if k_max > 1:
        out["pooled"] = gain_curve(p[:, :-1].ravel(), p[:, 1:].ravel(), bins,
                                   by=None if x is None else np.repeat(x[:, None], k_max - 1, 1).ravel())
    out["mean_p_by_step"] = [float(np.nanmean(p[:, k])) if np.isfinite(p[:, k]).any() else None
                             for k in range(k_max)]
    with np.errstate(divide="ignore"):
        out["mean_nll_by_step"] = [float(np.nanmean(-np.log(np.maximum(p[:, k], 1e-300))))
                                   if np.isfinite(p[:, k]).any() else None for k in range(k_max)]
    return out


# -- steps against difficulty -------------------------------------------------------------------

def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (``scipy.stats.rankdata``'s default)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(xs.size)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (Pearson on average ranks); NaN when either side is constant."""
    return pearson(rankdata(x), rankdata(y))


def steps_histogram(steps: np.ndarray, max_steps: int) -> list[float]:
    """Fraction of tokens that ran 1, 2, ..., max_steps passes."""
    s = np.asarray(steps).ravel()
    return [float((s == k).mean()) for k in range(1, max_steps + 1)]


def steps_vs_difficulty(steps: np.ndarray, ref_nll: np.ndarray, max_steps: int,
                        n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Spearman and Pearson correlation of ``steps [R, T]`` with a reference loss ``[R, T]``;
    a 95% percentile interval for Spearman from ``n_boot`` resamples of whole rows (tokens of a
    row are not independent); mean reference loss and token share per step count."""
    steps, ref = np.asarray(steps), np.asarray(ref_nll, dtype=np.float64)
    if steps.shape != ref.shape or steps.ndim != 2:
        raise ValueError(f"steps {steps.shape} and reference loss {ref.shape}: expected the same "
                         "[rows, seq] shape")
    rho = spearman(steps, ref)
    boot = []
    if math.isfinite(rho) and n_boot:
        rng = np.random.default_rng(seed)
        for _ in range(n_boot):
            pick = rng.integers(0, steps.shape[0], steps.shape[0])
            r = spearman(steps[pick], ref[pick])
            if math.isfinite(r):
                boot.append(r)
    by_steps = []
    for k in range(1, max_steps + 1):
        v = ref[steps == k]
        by_steps.append({"steps": k, "count": int(v.size), "frac": float(v.size / steps.size),
                         "mean_ref_nll": float(v.mean()) if v.size else None,
                         "sem": float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else None})
    return {"spearman": rho, "spearman_ci95": ([float(np.percentile(boot, 2.5)),
                                                float(np.percentile(boot, 97.5))] if boot else None),
            "pearson": pearson(steps, ref), "tokens": int(steps.size), "by_steps": by_steps}
