"""The one FLOPs model (multiply-add = 2 FLOPs), from the token slots actually processed.

Training = 3 x forward (backward costs two forward-sized matmuls per matmul). Attention is
counted from the exact number of visible (query, key) pairs, not a causal constant; embedding
lookups, norms and softmax are not counted. Two entry points share the same formulas:

- **measured**: per-step active counts and visible pairs (:func:`latent_train_flops`,
  :func:`latent_forward_flops`), what the scheduler and the decoder count;
- **analytic**: the expected counts of one full sequence from a distribution of last steps
  (:func:`method_counts`, :func:`inference_flops_per_token`), what the planner and the
  comparison tables use. The formulas are linear in every count, so expected (float) counts
  give expected FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megatron_latentcot.config import ModelConfig

# Dense (no sparsity) bf16 peak TFLOP/s per device, for MFU. Looked up by substring of the
# device name, first match wins: the specific "H100 PCIe" / "H100 NVL" before "H100" (the SXM
# part; torch names it e.g. "NVIDIA H100 80GB HBM3"). "GH200" matches "H200" (same 989).
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0,
               "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def layer_matmul_flops_per_token(m: ModelConfig) -> int:
    d, q, kv = m.hidden_size, m.num_attention_heads * m.head_dim, m.kv_heads * m.head_dim
    return 2 * (d * (q + 2 * kv) + q * d + 3 * d * m.ffn_hidden_size)


def attention_flops(m: ModelConfig, visible_pairs: float) -> float:
    """Scores and weighted sum over ``visible_pairs`` (query, key) pairs, one layer."""
    return 4 * m.num_attention_heads * m.head_dim * visible_pairs


def head_flops(m: ModelConfig, vocab: int, tokens: float) -> float:
    """The LM head (hidden -> vocab) on ``tokens`` slots, one forward."""
    return 2 * m.hidden_size * vocab * tokens


def router_flops(m: ModelConfig, tokens: float) -> float:
    """The router (hidden -> one logit) on ``tokens`` slots, one forward."""
    return 2 * m.hidden_size * tokens


def causal_pairs(rows: int, seq: int) -> int:
    return rows * seq * (seq + 1) // 2


def forward_flops(m: ModelConfig, vocab: int, token_slots: int, visible_pairs: int,
                  head_tokens: int) -> float:
    """One forward: ``token_slots`` through every layer, ``head_tokens`` through the LM head."""
    per_layer = layer_matmul_flops_per_token(m) * token_slots + attention_flops(m, visible_pairs)
    return m.num_layers * per_layer + head_flops(m, vocab, head_tokens)


def vanilla_train_flops(m: ModelConfig, vocab: int, rows: int, seq: int) -> float:
    tokens = rows * seq
    return 3 * forward_flops(m, vocab, tokens, causal_pairs(rows, seq), tokens)


def latent_forward_flops(m: ModelConfig, vocab: int, step_tokens: Sequence[float],
                         step_pairs: Sequence[float], head_tokens: float,
                         router_tokens: float = 0,
                         step_layers: Sequence[float] | None = None) -> float:
    """One forward of a latent-loop micro-batch from its per-step counts.

    ``step_tokens[k]`` slots ran step k+1 with ``step_pairs[k]`` visible attention pairs,
    through ``step_layers[k]`` layers (None: every run through all ``m.num_layers``; MoR's runs
    differ); the LM head ran on ``head_tokens`` (z^f); the router (one output) on
    ``router_tokens``.
    """
    depth = step_layers if step_layers is not None else [m.num_layers] * len(step_tokens)
    layers = sum(d * (layer_matmul_flops_per_token(m) * n + attention_flops(m, p))
                 for n, p, d in zip(step_tokens, step_pairs, depth))
    return layers + head_flops(m, vocab, head_tokens) + router_flops(m, router_tokens)


def latent_train_flops(m: ModelConfig, vocab: int, step_tokens: Sequence[float],
                       step_pairs: Sequence[float], head_tokens: float, ptarget_tokens: float = 0,
                       router_tokens: float = 0,
                       step_layers: Sequence[float] | None = None) -> float:
    """Forward + backward of a latent-loop micro-batch (:func:`latent_forward_flops` x 3) plus
    the per-step p_target head, which runs forward only, without gradient, on
    ``ptarget_tokens``."""
    forward = latent_forward_flops(m, vocab, step_tokens, step_pairs, head_tokens, router_tokens,
                                   step_layers)
    return 3 * forward + head_flops(m, vocab, ptarget_tokens)


# -- analytic: expected counts of one full sequence ------------------------------------------------

METHODS_COUNTED = ("vanilla", "looped", "pause", "pondering", "ponderlm2", "latent_fixed",
                   "adaptive", "mor")


def ponderlm2_passes(stages: int, jacobi: int) -> list[int]:
    """Stages p of each PonderLM-2 training pass (each over p*T interleaved slots): the growing
    initial passes 1..S-1, then ``jacobi`` Jacobi passes and the final pass over all S
    (docs/baselines_ponderlm2_mor.md 1.3). The one list the step generator, the FLOPs and the
    planner read."""
    return list(range(1, stages)) + [stages] * (jacobi + 1)


def _require_jacobi(jacobi: int | None) -> int:
    if jacobi is None:
        raise ValueError("ponderlm2: the number of Jacobi passes (jacobi) is required")
    return jacobi


@dataclass
class StepCounts:
    """What one full sequence runs: the arguments of :func:`latent_train_flops`.

    Expectations (floats) for the adaptive method, exact integers otherwise (so the fixed
    methods' FLOPs are exact integers too).
    """

    step_tokens: list[float]
    step_pairs: list[float]
    head_tokens: float
    ptarget_tokens: float = 0.0
    router_tokens: float = 0.0
    step_layers: list[float] | None = None  # layers per run (None: all; MoR's runs differ)

    def train_flops(self, m: ModelConfig, vocab: int) -> float:
        return latent_train_flops(m, vocab, self.step_tokens, self.step_pairs, self.head_tokens,
                                  self.ptarget_tokens, self.router_tokens, self.step_layers)


def active_fractions(dist: Sequence[float]) -> list[float]:
    """a_k: the fraction of tokens that run step k (last step >= k), from the distribution
    ``dist[k-1]`` of last steps."""
    return [sum(dist[k:]) for k in range(len(dist))]


def last_step_dist(active: Sequence[float]) -> list[float]:
    """The inverse of :func:`active_fractions`: every token runs step 1 (``active[0]`` is
    taken as 1), and a_k - a_(k+1) of them stop after step k."""
    a = [1.0, *active[1:]] + [0.0]
    return [a[k] - a[k + 1] for k in range(len(active))]


def _latent_counts_from_active(seq: int, a: Sequence[float], adaptive: bool,
                               ptarget: bool) -> StepCounts:
    earlier = seq * (seq - 1) / 2
    tokens = [ak * seq for ak in a]
    pairs = [a[k] * (seq * (k + 1) + earlier * sum(a[:k + 1])) for k in range(len(a))]
    if not adaptive:
        return StepCounts(tokens, pairs, seq)
    # the router runs at every step < K_max; the p_target head (no gradient) at steps >= 2
    return StepCounts(tokens, pairs, seq, ptarget_tokens=sum(tokens[1:]) if ptarget else 0.0,
                      router_tokens=sum(tokens[:-1]))


def latent_counts(seq: int, dist: Sequence[float], adaptive: bool, ptarget: bool) -> StepCounts:
    """Expected per-step counts of the latent loop on one sequence of ``seq`` tokens, halting
    independent of position, ``dist``: the distribution of last steps.

    Query (t, k) sees (t', j) for t' <= t, j <= k when (t', j) ran: its own k slots and, for each
    of the t earlier positions, ``a_1 + ... + a_k`` slots in expectation.
    """
    return _latent_counts_from_active(seq, active_fractions(dist), adaptive, ptarget)


def mor_counts(seq: int, base_depth: int, capacity: Sequence[float] | None = None,
               dist: Sequence[float] | None = None) -> StepCounts:
    """MoR on one sequence (docs/baselines_ponderlm2_mor.md 2.7): the first and last layers on
    every token; recursion r through ``base_depth`` layers on n_r tokens, causal among them
    (n_r (n_r + 1) / 2 pairs). Expert-choice (``capacity`` c_r): n_r = max(1, floor(c_r T)),
    router r on the n_(r-1) candidates. Token-choice (``dist``: the fraction of tokens at each
    depth): expected n_r = T a_r, pairs a_r^2 T(T-1)/2 + a_r T (depths independent of position),
    one N_r-output router on every token. Without document masking."""
    if (capacity is None) == (dist is None):
        raise ValueError("mor: give the expert capacities or the token-choice depth distribution")
    full = causal_pairs(1, seq)
    if capacity is not None:
        n = [float(max(1, int(c * seq))) for c in capacity]
        pairs = [m * (m + 1) / 2 for m in n]
        router = float(sum([seq, *n[:-1]]))
    else:
        a = active_fractions(dist)
        n = [ar * seq for ar in a]
        pairs = [ar * ar * seq * (seq - 1) / 2 + ar * seq for ar in a]
        router = float(seq * len(dist))
    return StepCounts([seq, *n, seq], [full, *pairs, full], seq, router_tokens=router,
                      step_layers=[1, *[base_depth] * len(n), 1])


def method_counts(method: str, seq: int, k: int, dist: Sequence[float] | None = None,
                  ptarget: bool = True, jacobi: int | None = None,
                  base_depth: int | None = None,
                  capacity: Sequence[float] | None = None) -> StepCounts:
    """The scheduler's counts for one full sequence of ``method`` with K_max = ``k``.

    ``dist``: adaptive's distribution of last steps (required for it); ``ptarget``: the adaptive
    loss is on (its per-step p_target head runs); ``jacobi``: PonderLM-2's J (required for it);
    MoR (k = N_r): ``base_depth`` and ``capacity`` (expert) or ``dist`` (token), see
    :func:`mor_counts`.
    """
    if method == "mor":
        if base_depth is None:
            raise ValueError("mor: the shared block's base_depth is required")
        return mor_counts(seq, base_depth, capacity, dist)
    full = causal_pairs(1, seq)
    if method == "vanilla":
        return StepCounts([seq], [full], seq)
    if method == "looped":
        return StepCounts([seq] * k, [full] * k, seq)
    if method == "pondering":  # K-1 extra LM heads and expected-embedding matmuls, with gradient
        return StepCounts([seq] * k, [full] * k, seq * (2 * k - 1))
    if method == "pause":  # one pass over the K-times longer sequence
        return StepCounts([seq * k], [causal_pairs(1, seq * k)], seq)
    if method == "ponderlm2":  # fresh causal passes over p*T interleaved slots, one LM head
        lengths = [seq * p for p in ponderlm2_passes(k, _require_jacobi(jacobi))]
        return StepCounts(lengths, [causal_pairs(1, n) for n in lengths], seq)
    if method == "latent_fixed":
        return latent_counts(seq, [0.0] * (k - 1) + [1.0], adaptive=False, ptarget=False)
    if method == "adaptive":
        if dist is None:
            raise ValueError("adaptive: a distribution of last steps is required")
        if len(dist) != k:
            raise ValueError(f"adaptive: expected {k} fractions (steps 1..K_max), got {len(dist)}")
        return latent_counts(seq, dist, adaptive=True, ptarget=ptarget)
    raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS_COUNTED)}")


def train_flops_per_token(m: ModelConfig, vocab: int, counts: StepCounts, seq: int) -> float:
    """Forward + backward FLOPs per real token of a sequence of ``seq`` tokens."""
    return counts.train_flops(m, vocab) / seq


def kaplan_flops_per_token(params: int, passes: float) -> float:
    """The paper's convention next to the exact count: 6 N per (token, pass) slot, N = all
    parameters (embeddings included)."""
    return 6.0 * params * passes


def _mor_expert_counts(seq: int | None, base_depth: int | None,
                       capacity: Sequence[float] | None) -> StepCounts:
    """MoR's counts where they are fixed: expert-choice with its capacities (token-choice's
    depths come from the router, so its cost is the router's to decide)."""
    if capacity is None:
        raise ValueError("mor: only expert-choice (capacity) has a routing-independent count; "
                         "token-choice's depends on its router: count it from a run")
    if seq is None or base_depth is None:
        raise ValueError("mor: seq and the shared block's base_depth are required")
    return mor_counts(seq, base_depth, capacity)


def passes_per_token(method: str, k: int, dist: Sequence[float] | None = None,
                     jacobi: int | None = None, *, seq: int | None = None,
                     base_depth: int | None = None,
                     capacity: Sequence[float] | None = None) -> float:
    """Processed (token, pass) slots per token: the multiplier of the paper's 6·N convention
    (PonderLM-2: n(n+1)/2 + (J+1)(n+1) with n = K-1 latent stages; 3 + 2J at n = 1).
    MoR expert-choice (``seq``, ``base_depth``, ``capacity``): layers run per token over its
    2 + base_depth physical layers, (2 + base_depth sum_r n_r / T) / (2 + base_depth) with
    n_r = max(1, floor(c_r T)) (docs/baselines_ponderlm2_mor.md 2.7), as plan.passes_per_token
    counts it; token-choice raises."""
    if method == "vanilla":
        return 1.0
    if method == "mor":
        c = _mor_expert_counts(seq, base_depth, capacity)
        slots = sum(t * d for t, d in zip(c.step_tokens, c.step_layers or []))
        return slots / (seq * (2 + base_depth))
    if method == "ponderlm2":
        return float(sum(ponderlm2_passes(k, _require_jacobi(jacobi))))
    if method == "adaptive":
        if dist is None:
            raise ValueError("adaptive: a distribution of last steps is required")
        return sum(active_fractions(dist))
    return float(k)


def inference_flops_per_token(m: ModelConfig, vocab: int, method: str, seq: int, k: int,
                              dist: Sequence[float] | None = None, *,
                              base_depth: int | None = None,
                              capacity: Sequence[float] | None = None) -> float:
    """Forward FLOPs to generate one token at position ``seq // 2`` with a K/V cache of every
    executed slot: the LM head once per token (plus pondering's per-pass heads and expected
    embeddings), no p_target head; adaptive at the distribution ``dist`` of last steps.
    PonderLM-2 decodes with the exact recurrence (its K stages one after another, like pause's
    K slots), not with the training forward's Jacobi passes. MoR expert-choice (``base_depth``,
    ``capacity``): at the training capacities' profile, recursion r on a share a_r = n_r / T
    of tokens with a recursion-wise cache of 1 + c a_r keys, router r on a_(r-1) (the decoder's
    threshold rule routes by score, so a trained model's decoding may run more or fewer);
    token-choice raises (its depths are the router's)."""
    c = seq // 2
    layer, L, head = layer_matmul_flops_per_token(m), m.num_layers, head_flops(m, vocab, 1)
    if method == "mor":
        counts = _mor_expert_counts(seq, base_depth, capacity)
        a = [1.0] + [n / seq for n in counts.step_tokens[1:-1]]
        ends = 2 * (layer + attention_flops(m, c + 1))  # the unique first and last layers
        rec = sum(ar * base_depth * (layer + attention_flops(m, 1 + c * ar)) for ar in a[1:])
        return ends + rec + router_flops(m, sum(a[:-1])) + head
    if method == "vanilla":
        k = 1
    if method in ("vanilla", "looped", "pondering"):
        heads = 2 * k - 1 if method == "pondering" else 1  # + K-1 heads and expected embeddings
        return k * L * (layer + attention_flops(m, c + 1)) + heads * head
    if method in ("pause", "ponderlm2"):  # K slots per token, over a K-times longer cache
        attn = sum(attention_flops(m, k * c + j) for j in range(1, k + 1))
        return k * L * layer + L * attn + head
    if method == "latent_fixed":
        dist = [0.0] * (k - 1) + [1.0]
    elif method != "adaptive":
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS_COUNTED)}")
    if dist is None:
        raise ValueError(f"{method}: a distribution of last steps is required")
    a = active_fractions(dist)
    total = float(head)
    for step in range(len(a)):
        keys = (step + 1) + c * sum(a[:step + 1])
        total += a[step] * L * (layer + attention_flops(m, keys))
        if method == "adaptive" and step < len(a) - 1:
            total += a[step] * router_flops(m, 1)
    return total


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """``override``, else the first :data:`PEAK_TFLOPS` key in ``device_name`` (any case);
    None when the device is unknown (no MFU is reported rather than a wrong one)."""
    if override is not None:
        return override
    name = device_name.lower()
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in name:
            return value
    return None
