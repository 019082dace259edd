"""Deliberately naive float64 reference of every method in /work/shared/METHOD.md (test oracle).

Readable, not fast: python loops over steps, layers, rows and tokens; every query recomputes its
keys/values from the stored layer inputs of exactly the key slots it is allowed to see. No KV
cache, no compaction, no batching tricks. All arithmetic is float64.

Conventions (fixed by the test brief, HF-Llama-like): RMSNorm ``x / sqrt(mean(x^2) + eps) * w``;
SwiGLU ``down(silu(gate(x)) * up(x))``; pre-norm blocks; HF RoPE (non-interleaved, rotate_half,
``inv_freq = theta^(-arange(0, hd, 2) / hd)``); GQA head ``j`` uses kv head ``j // (nh / nkv)``;
scores scaled by ``1 / sqrt(hd)``; token embedding ``embed_tokens[x_t] * embedding_multiplier``.

A *slot* is a tuple identifying one executed position: ``(b, t)`` for a plain causal sequence,
``(b, t, k)`` for step ``k`` (1-based) of token ``t`` in the latent scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Slot = tuple[int, ...]
Params = dict[str, torch.Tensor]
DT = torch.float64


@dataclass(frozen=True)
class RefConfig:
    """Model + method hyper-parameters. ``max_steps`` is K (K_max / R / passes / 1 + pauses)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    embedding_multiplier: float = 1.0
    max_steps: int = 4
    tau: float = 0.1
    adaptive_loss_weight: float = 0.1
    adaptive_loss_beta: float = 1.0
    tie_embeddings: bool = False
    jacobi_iterations: int = 3  # PonderLM-2's Jacobi passes J

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------


def random_params(
    cfg: RefConfig,
    seed: int,
    std: float = 0.02,
    router_bias: float = 0.0,
    norm_noise: float = 0.1,
) -> Params:
    """Random float64 leaf params (requires_grad) with the names of the test brief.

    Linear/embedding weights ~ N(0, std^2); RMSNorm weights ~ 1 + N(0, norm_noise^2) (noise so a
    test notices a norm weight applied in the wrong place); router.bias = ``router_bias``.
    ``lm_head.weight`` is omitted when ``cfg.tie_embeddings``. ``router.*`` and
    ``pause_embeddings.weight`` ([K-1, H]) are always created (unused by other methods).
    """
    g = torch.Generator().manual_seed(seed)
    h, f, v, hd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.head_dim
    nh, nkv = cfg.num_heads, cfg.num_kv_heads

    def lin(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=DT) * std

    def norm_w() -> torch.Tensor:
        return 1.0 + torch.randn(h, generator=g, dtype=DT) * norm_noise

    p: Params = {"embed_tokens.weight": lin(v, h)}
    for i in range(cfg.num_layers):
        pre = f"layers.{i}."
        p[pre + "input_layernorm.weight"] = norm_w()
        p[pre + "self_attn.q_proj.weight"] = lin(nh * hd, h)
        p[pre + "self_attn.k_proj.weight"] = lin(nkv * hd, h)
        p[pre + "self_attn.v_proj.weight"] = lin(nkv * hd, h)
        p[pre + "self_attn.o_proj.weight"] = lin(h, nh * hd)
        p[pre + "post_attention_layernorm.weight"] = norm_w()
        p[pre + "mlp.gate_proj.weight"] = lin(f, h)
        p[pre + "mlp.up_proj.weight"] = lin(f, h)
        p[pre + "mlp.down_proj.weight"] = lin(h, f)
    p["norm.weight"] = norm_w()
    if not cfg.tie_embeddings:
        p["lm_head.weight"] = lin(v, h)
    p["router.weight"] = lin(1, h)
    p["router.bias"] = torch.full((1,), float(router_bias), dtype=DT)
    p["pause_embeddings.weight"] = lin(max(cfg.max_steps - 1, 0), h)
    return {k: t.requires_grad_(True) for k, t in p.items()}


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w over the last dim."""
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """HF RoPE. x: [..., n_heads, hd] with leading dims matching ``pos`` ([...] ints)."""
    hd = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=DT) / hd)  # [hd/2]
    ang = pos.to(DT)[..., None] * inv_freq  # [..., hd/2]
    emb = torch.cat([ang, ang], dim=-1)[..., None, :]  # [..., 1, hd] (broadcast over heads)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    rotate_half = torch.cat([-x2, x1], dim=-1)
    return x * emb.cos() + rotate_half * emb.sin()


def lm_head_weight(params: Params, cfg: RefConfig) -> torch.Tensor:
    """[V, H] output matrix; the embedding matrix when embeddings are tied."""
    return params["embed_tokens.weight"] if cfg.tie_embeddings else params["lm_head.weight"]


def embed(params: Params, cfg: RefConfig, token: int) -> torch.Tensor:
    """e_t = embed_tokens[x_t] * embedding_multiplier, shape [H]."""
    return params["embed_tokens.weight"][token] * cfg.embedding_multiplier


def final_norm(params: Params, cfg: RefConfig, h: torch.Tensor) -> torch.Tensor:
    """The model's final RMSNorm (z = norm(h), METHOD.md 'z is taken after the final RMSNorm')."""
    return rms_norm(h, params["norm.weight"], cfg.norm_eps)


def mlp(params: Params, layer: int, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    pre = f"layers.{layer}.mlp."
    gate = x @ params[pre + "gate_proj.weight"].T
    up = x @ params[pre + "up_proj.weight"].T
    return (F.silu(gate) * up) @ params[pre + "down_proj.weight"].T


def attention_one_query(
    params: Params,
    cfg: RefConfig,
    layer: int,
    q_in: torch.Tensor,
    q_pos: int,
    key_ins: list[torch.Tensor],
    key_pos: list[int],
) -> torch.Tensor:
    """Attention output (after o_proj) of ONE query over exactly the given key slots.

    ``q_in`` / ``key_ins`` are the (already input_layernorm-ed) layer inputs of the query slot and
    of each visible key slot; keys/values are recomputed here from those inputs (METHOD.md
    'Keys/values at layer l for (t_j, k_j) are computed from that layer's input at (t_j, k_j)').
    """
    pre = f"layers.{layer}.self_attn."
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    group = nh // nkv
    q = (q_in @ params[pre + "q_proj.weight"].T).view(nh, hd)
    q = rope(q, torch.tensor(q_pos), cfg.rope_theta)  # [nh, hd]
    xk = torch.stack(key_ins)  # [n, H]
    kpos = torch.tensor(key_pos)
    k = rope((xk @ params[pre + "k_proj.weight"].T).view(-1, nkv, hd), kpos, cfg.rope_theta)
    v = (xk @ params[pre + "v_proj.weight"].T).view(-1, nkv, hd)
    heads = []
    for j in range(nh):
        kv_head = j // group  # GQA
        scores = (k[:, kv_head, :] @ q[j]) / math.sqrt(hd)  # [n]
        probs = torch.softmax(scores, dim=0)
        heads.append(probs @ v[:, kv_head, :])  # [hd]
    return torch.cat(heads) @ params[pre + "o_proj.weight"].T  # [H]


def run_layers(
    params: Params,
    cfg: RefConfig,
    new_inputs: dict[Slot, torch.Tensor],
    pos_of: Callable[[Slot], int],
    visible: Callable[[Slot, Slot], bool],
    history: list[dict[Slot, torch.Tensor]],
    layers: Sequence[int] | None = None,
) -> dict[Slot, torch.Tensor]:
    """Run the whole layer stack for the slots in ``new_inputs`` (one 'wave' executed together).

    ``history[l]`` maps every already executed slot to its raw layer-``l`` input; the new slots
    are added to it layer by layer *before* their queries attend, so slots of the same wave see
    each other as the visibility rule allows. Query slot ``s`` attends to every slot ``s2`` in
    ``history[l]`` with ``visible(s, s2)``. Pre-norm blocks:
    h = h + o_proj(attn(input_layernorm(h))); h = h + mlp(post_attention_layernorm(h)).
    Returns each new slot's last-layer output (raw residual stream, no final norm).
    ``layers``: only these layer indices, in this order (default all; MoR's shared block).
    """
    x = dict(new_inputs)
    for layer in range(cfg.num_layers) if layers is None else layers:
        pre = f"layers.{layer}."
        ln1, ln2 = (
            params[pre + "input_layernorm.weight"],
            params[pre + "post_attention_layernorm.weight"],
        )
        for s, h in x.items():
            history[layer][s] = h
        out: dict[Slot, torch.Tensor] = {}
        for s, h in x.items():
            keys = [s2 for s2 in history[layer] if visible(s, s2)]
            attn = attention_one_query(
                params,
                cfg,
                layer,
                rms_norm(h, ln1, cfg.norm_eps),
                pos_of(s),
                [rms_norm(history[layer][s2], ln1, cfg.norm_eps) for s2 in keys],
                [pos_of(s2) for s2 in keys],
            )
            h = h + attn
            h = h + mlp(params, layer, rms_norm(h, ln2, cfg.norm_eps))
            out[s] = h
        x = out
    return x


def causal_forward(
    params: Params,
    cfg: RefConfig,
    inputs: torch.Tensor,
    doc_ids: torch.Tensor | None,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """Plain causal stack over inputs [B, N, H] -> last-layer output [B, N, H] (no final norm).

    RoPE position of index n is n; query (b, n) sees keys (b, m) with m <= n (and the same doc id
    when ``doc_ids`` [B, N] is given). Fresh history: no KV from any other forward.
    """
    b_sz, n = inputs.shape[:2]

    def visible(s: Slot, s2: Slot) -> bool:
        same_doc = doc_ids is None or bool(doc_ids[s[0], s2[1]] == doc_ids[s[0], s[1]])
        return s2[0] == s[0] and s2[1] <= s[1] and same_doc

    history: list[dict[Slot, torch.Tensor]] = [{} for _ in range(cfg.num_layers)]
    new = {(b, t): inputs[b, t] for b in range(b_sz) for t in range(n)}
    out = run_layers(params, cfg, new, lambda s: s[1], visible, history, layers)
    return torch.stack([torch.stack([out[(b, t)] for t in range(n)]) for b in range(b_sz)])


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """sum_t loss_mask_t * CE(logits_t, label_t) / sum(loss_mask); tokens with mask 0 skipped."""
    total = logits.new_zeros(())
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            m = float(loss_mask[b, t])
            if m != 0.0:
                total = total - m * torch.log_softmax(logits[b, t], dim=-1)[int(labels[b, t])]
    return total / loss_mask.to(DT).sum()


def _embed_all(params: Params, cfg: RefConfig, tokens: torch.Tensor) -> torch.Tensor:
    b_sz, n = tokens.shape
    rows = [
        torch.stack([embed(params, cfg, int(tokens[b, t])) for t in range(n)]) for b in range(b_sz)
    ]
    return torch.stack(rows)


def _normed_head(
    params: Params, cfg: RefConfig, z: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Logits of final-norm outputs z [B, T, H] and their L_LM (the only loss)."""
    logits = z @ lm_head_weight(params, cfg).T
    lm_loss = masked_ce(logits, labels, loss_mask)
    return {"logits": logits, "lm_loss": lm_loss, "loss": lm_loss}


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------


def vanilla(
    params: Params,
    cfg: RefConfig,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """METHOD.md 'vanilla': plain causal Llama; logits = norm(h) @ lm_head.T; loss = L_LM."""
    h = causal_forward(params, cfg, _embed_all(params, cfg, tokens), doc_ids)
    return _normed_head(params, cfg, final_norm(params, cfg, h), labels, loss_mask)


def looped(
    params: Params,
    cfg: RefConfig,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """METHOD.md 'looped' (R = max_steps): the stack applied R times with shared weights.

    Repeat r+1's input is repeat r's raw last-layer output; each repeat is an independent causal
    forward (no KV across repeats); final norm once at the end.
    """
    h = _embed_all(params, cfg, tokens)
    for _ in range(cfg.max_steps):
        h = causal_forward(params, cfg, h, doc_ids)
    return _normed_head(params, cfg, final_norm(params, cfg, h), labels, loss_mask)


def pondering(
    params: Params,
    cfg: RefConfig,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """METHOD.md 'pondering' (K = max_steps passes), conventions of the test brief.

    Pass 1 input e_t; pass j+1 input e_t + softmax(norm(h_j) @ lm_head.T)_t @ (E * sqrt(d))
    (the [prior] formula: sqrt(hidden size), whatever the token embeddings' multiplier);
    independent causal passes; logits = norm(h_K) @ lm_head.T.
    """
    e = _embed_all(params, cfg, tokens)
    w_out = lm_head_weight(params, cfg)
    e_mat = params["embed_tokens.weight"] * math.sqrt(cfg.hidden_size)
    h = causal_forward(params, cfg, e, doc_ids)
    for _ in range(cfg.max_steps - 1):
        probs = torch.softmax(final_norm(params, cfg, h) @ w_out.T, dim=-1)
        h = causal_forward(params, cfg, e + probs @ e_mat, doc_ids)
    return _normed_head(params, cfg, final_norm(params, cfg, h), labels, loss_mask)


def pause(
    params: Params,
    cfg: RefConfig,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """METHOD.md 'pause' (K-1 pause tokens after every token, K = max_steps).

    Sequence per token: [e_t, p_1, ..., p_{K-1}] (pause embeddings not multiplied), length T*K,
    RoPE positions 0..T*K-1, plain causal attention (doc ids repeated K times). label_t is
    predicted at the last pause slot of token t (index t*K + K-1); loss over real targets only.
    """
    b_sz, n = tokens.shape
    k_sz = cfg.max_steps
    pauses = params["pause_embeddings.weight"]
    rows = []
    for b in range(b_sz):
        seq = []
        for t in range(n):
            seq.append(embed(params, cfg, int(tokens[b, t])))
            seq.extend(pauses[i] for i in range(k_sz - 1))
        rows.append(torch.stack(seq))
    x = torch.stack(rows)  # [B, T*K, H]
    docs = None if doc_ids is None else doc_ids.repeat_interleave(k_sz, dim=1)
    h = causal_forward(params, cfg, x, docs)
    h_read = h[:, k_sz - 1 :: k_sz, :]  # [B, T, H]: last slot of each token's group
    return _normed_head(params, cfg, final_norm(params, cfg, h_read), labels, loss_mask)


def _ponderlm2_visible(doc_ids: torch.Tensor | None) -> Callable[[Slot, Slot], bool]:
    """PonderLM-2's causal rule over the interleaved slots (b, t, i) (stage i of token t): same
    row (and doc), and t' < t, or t' == t with i' <= i."""

    def visible(s: Slot, s2: Slot) -> bool:
        same_doc = doc_ids is None or bool(doc_ids[s[0], s2[1]] == doc_ids[s[0], s[1]])
        earlier = s2[1] < s[1] or (s2[1] == s[1] and s2[2] <= s[2])
        return s2[0] == s[0] and earlier and same_doc

    return visible


def _ponderlm2_pass(
    params: Params, cfg: RefConfig, stage_inputs: list[torch.Tensor], doc_ids: torch.Tensor | None
) -> list[torch.Tensor]:
    """One fresh pass over the stages [B, T, H] of ``stage_inputs`` (all executed together, every
    stage at RoPE position t) -> each stage's final-norm output [B, T, H]."""
    b_sz, n = stage_inputs[0].shape[:2]
    history: list[dict[Slot, torch.Tensor]] = [{} for _ in range(cfg.num_layers)]
    new = {(b, t, i): x[b, t] for i, x in enumerate(stage_inputs)
           for b in range(b_sz) for t in range(n)}
    out = run_layers(params, cfg, new, lambda s: s[1], _ponderlm2_visible(doc_ids), history)
    return [
        final_norm(params, cfg, torch.stack([torch.stack([out[(b, t, i)] for t in range(n)])
                                             for b in range(b_sz)]))
        for i in range(len(stage_inputs))
    ]


def ponderlm2(
    params: Params,
    cfg: RefConfig,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """PonderLM-2's training forward (docs/baselines_ponderlm2_mor.md 1.3), S = max_steps stages.

    z^(0) = e. Initial passes p = 1..S-1 over stages 0..p-1, each replacing z^(1..p) by the
    outputs of stages 0..p-1; then J = jacobi_iterations passes over all S stages, each
    replacing z^(1..S-1) by the outputs of stages 0..S-2; a final pass; logits = lm_head of the
    last stage's output. All passes differentiable.
    """
    s_max = cfg.max_steps
    e = _embed_all(params, cfg, tokens)
    z: list[torch.Tensor] = []  # z^(1), z^(2), ...
    for _ in range(1, s_max):  # initial passes
        z = _ponderlm2_pass(params, cfg, [e, *z], doc_ids)
    for _ in range(cfg.jacobi_iterations):
        z = _ponderlm2_pass(params, cfg, [e, *z], doc_ids)[: s_max - 1]
    last = _ponderlm2_pass(params, cfg, [e, *z], doc_ids)[-1]
    return _normed_head(params, cfg, last, labels, loss_mask)


def ponderlm2_exact(
    params: Params,
    cfg: RefConfig,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The exact PonderLM-2 recurrence (its decoding, 1.5): one slot at a time in (t, i) order,
    stage i+1's input the final-norm output of stage i, each slot attending under the causal
    rule to every slot already executed; logits from the last stage."""
    b_sz, n = tokens.shape
    history: list[dict[Slot, torch.Tensor]] = [{} for _ in range(cfg.num_layers)]
    visible = _ponderlm2_visible(doc_ids)
    rows = []
    for b in range(b_sz):
        row = []
        for t in range(n):
            x = embed(params, cfg, int(tokens[b, t]))
            for i in range(cfg.max_steps):
                out = run_layers(params, cfg, {(b, t, i): x}, lambda s: s[1], visible, history)
                x = final_norm(params, cfg, out[(b, t, i)])
            row.append(x)
        rows.append(torch.stack(row))
    return _normed_head(params, cfg, torch.stack(rows), labels, loss_mask)


def _latent(
    params: Params,
    cfg: RefConfig,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    doc_ids: torch.Tensor | None,
    use_router: bool,
) -> dict[str, torch.Tensor]:
    """The latent-step scheduler (METHOD.md 'Steps and inputs', 'Parallel masking', 'Router').

    Steps are executed one at a time over all tokens of all rows. Step 1 input e_t; step k+1
    input z^(k) = norm(h^(k)); RoPE position t for every step. Query (b, t, k) sees executed
    (b, t', k') with t' <= t, k' <= k (and same doc). With ``use_router`` the gate/reach/prune
    rules apply; without it (latent_fixed) every token runs K steps and z^f = z^(K).

    Returns (k is 1-based in the text, index k-1 in tensors): ``z`` [B,T,K,H] z^(k) (NaN where
    not executed); ``gates`` [B,T,K] g^(k) (NaN where not computed: k = K, not executed, or
    latent_fixed); ``reach`` [B,T,K+1] reach^(1..K+1) wherever the recursion defines it (this
    includes reach^(last_t+1) = reach^(last_t) g^(last_t) <= tau of a pruned token), else 0
    (latent_fixed: 1 for k <= K); ``exit`` [B,T,K] (0 beyond last_t); ``steps`` [B,T] last_t;
    ``p_target`` [B,T,K] detached (NaN where not executed or label out of range); ``z_final``
    [B,T,H]; ``logits``, ``lm_loss``, ``adaptive_loss`` (0 for latent_fixed), ``loss``.
    """
    b_sz, n = tokens.shape
    k_max = cfg.max_steps
    nan = float("nan")

    def visible(s: Slot, s2: Slot) -> bool:
        b, t, k = s
        b2, t2, k2 = s2
        same_doc = doc_ids is None or bool(doc_ids[b, t2] == doc_ids[b, t])
        return b2 == b and t2 <= t and k2 <= k and same_doc

    history: list[dict[Slot, torch.Tensor]] = [{} for _ in range(cfg.num_layers)]
    z: dict[Slot, torch.Tensor] = {}
    gate: dict[Slot, torch.Tensor] = {}
    one = torch.ones((), dtype=DT)
    reach: dict[Slot, torch.Tensor] = {(b, t, 1): one for b in range(b_sz) for t in range(n)}
    last: dict[tuple[int, int], int] = {}

    inputs = {
        (b, t, 1): embed(params, cfg, int(tokens[b, t])) for b in range(b_sz) for t in range(n)
    }
    for k in range(1, k_max + 1):
        if not inputs:
            break
        outs = run_layers(params, cfg, inputs, lambda s: s[1], visible, history)
        nxt: dict[Slot, torch.Tensor] = {}
        for (b, t, _), h in outs.items():
            z[(b, t, k)] = final_norm(params, cfg, h)
            if k == k_max:  # k < K_max is required to continue; no gate at the last step
                last[(b, t)] = k
                continue
            if use_router:
                logit = z[(b, t, k)] @ params["router.weight"][0] + params["router.bias"][0]
                gate[(b, t, k)] = torch.sigmoid(logit)
                reach[(b, t, k + 1)] = reach[(b, t, k)] * gate[(b, t, k)]
                cont = float(reach[(b, t, k + 1)].detach()) > cfg.tau  # strict >
            else:
                reach[(b, t, k + 1)] = one
                cont = True
            if cont:
                nxt[(b, t, k + 1)] = z[(b, t, k)]  # z^(k) is the whole input of step k+1
            else:
                last[(b, t)] = k
        inputs = nxt

    # exits and the mixed hidden state z^f
    exit_p: dict[Slot, torch.Tensor] = {}
    z_f: dict[tuple[int, int], torch.Tensor] = {}
    for (b, t), lt in last.items():
        for k in range(1, lt + 1):
            if not use_router:
                exit_p[(b, t, k)] = one if k == lt else torch.zeros((), dtype=DT)
            elif k < lt:
                exit_p[(b, t, k)] = reach[(b, t, k)] * (1 - gate[(b, t, k)])
            else:
                exit_p[(b, t, k)] = reach[(b, t, k)]  # all remaining mass exits at last_t
        if use_router:
            z_f[(b, t)] = sum(exit_p[(b, t, k)] * z[(b, t, k)] for k in range(1, lt + 1))
        else:
            z_f[(b, t)] = z[(b, t, lt)]

    w_out = lm_head_weight(params, cfg)
    zf = torch.stack([torch.stack([z_f[(b, t)] for t in range(n)]) for b in range(b_sz)])
    logits = zf @ w_out.T  # no further norm
    lm_loss = masked_ce(logits, labels, loss_mask)

    # p_target^(k) = softmax(z^(k) @ lm_head.T)[label], detached; NaN where not computed
    p_target: dict[Slot, torch.Tensor] = {}
    for (b, t, k), zk in z.items():
        lab = int(labels[b, t])
        if 0 <= lab < cfg.vocab_size:
            p_target[(b, t, k)] = torch.softmax(zk @ w_out.T, dim=-1)[lab].detach()

    adaptive_loss = logits.new_zeros(())
    if use_router:
        for (b, t), lt in last.items():
            m = float(loss_mask[b, t])
            if m == 0.0:
                continue
            for k in range(1, lt):
                p = p_target[(b, t, k)] ** cfg.adaptive_loss_beta
                adaptive_loss = adaptive_loss + m * p * reach[(b, t, k + 1)]
        adaptive_loss = adaptive_loss / loss_mask.to(DT).sum()
        loss = lm_loss + cfg.adaptive_loss_weight * adaptive_loss
    else:
        loss = lm_loss

    hdim = cfg.hidden_size
    nan_vec = torch.full((hdim,), nan, dtype=DT)
    nan_s = torch.full((), nan, dtype=DT)
    zero_s = torch.zeros((), dtype=DT)

    def grid(d: dict[Slot, torch.Tensor], steps: int, fill: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [
                torch.stack(
                    [
                        torch.stack([d.get((b, t, k), fill) for k in range(1, steps + 1)])
                        for t in range(n)
                    ]
                )
                for b in range(b_sz)
            ]
        )

    return {
        "logits": logits,
        "lm_loss": lm_loss,
        "loss": loss,
        "adaptive_loss": adaptive_loss,
        "z": grid(z, k_max, nan_vec),  # [B, T, K, H]
        "z_final": zf,  # [B, T, H]
        "gates": grid(gate, k_max, nan_s),  # [B, T, K]
        "reach": grid(reach, k_max + 1, zero_s),  # [B, T, K+1]
        "exit": grid(exit_p, k_max, zero_s),  # [B, T, K]
        "p_target": grid(p_target, k_max, nan_s),  # [B, T, K]
        "steps": torch.tensor([[last[(b, t)] for t in range(n)] for b in range(b_sz)]),
    }


def adaptive(
    params: Params,
    cfg: RefConfig,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """METHOD.md adaptive latent CoT: router gates, reach/exit, tau pruning, L_LM + λ L_adaptive."""
    return _latent(params, cfg, tokens, labels, loss_mask, doc_ids, use_router=True)


def latent_fixed(
    params: Params,
    cfg: RefConfig,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """METHOD.md 'latent-fixed': the scheduler without router/pruning; z^f = z^(K); loss = L_LM."""
    return _latent(params, cfg, tokens, labels, loss_mask, doc_ids, use_router=False)


# --------------------------------------------------------------------------------------------
# Mixture-of-Recursions (docs/baselines_ponderlm2_mor.md 2, 3.3)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoRRef:
    """MoR's hyper-parameters. The params hold ``2 + D`` layers (``cfg.num_layers``): layer 0
    (first), 1..D (the shared block), D+1 (last), and ``mor_router.weight`` [N_r, H] (expert:
    row r is recursion r's Linear(H, 1); token: the Linear(H, N_r))."""

    num_recursion: int
    router: str  # "expert" | "token"
    capacity: tuple[float, ...]  # expert c_r
    alpha: float
    aux_coeff: float = 0.001
    bal_coeff: float = 0.1
    z_coeff: float = 1e-5
    combine: str = "weighted"  # or "replace": h <- F(h)
    selection: str = "topk"  # expert: or "threshold": a candidate continues iff sigmoid(a) >= 0.5


def _mor_block(
    params: Params,
    cfg: RefConfig,
    x: dict[tuple[int, int], torch.Tensor],
    doc_ids: torch.Tensor | None,
) -> dict[tuple[int, int], torch.Tensor]:
    """One recursion of the shared block over exactly the tokens in ``x`` ((b, t) -> h): fresh
    K/V (recursion-wise caching), so a token sees the earlier-or-equal positions of its row (and
    document) that are in ``x`` and nothing else."""

    def visible(s: Slot, s2: Slot) -> bool:
        same_doc = doc_ids is None or bool(doc_ids[s[0], s2[1]] == doc_ids[s[0], s[1]])
        return s2[0] == s[0] and s2[1] <= s[1] and same_doc

    history: list[dict[Slot, torch.Tensor]] = [{} for _ in range(cfg.num_layers)]
    block = range(1, cfg.num_layers - 1)
    return run_layers(params, cfg, dict(x), lambda s: s[1], visible, history, block)


def mor(
    params: Params,
    cfg: RefConfig,
    spec: MoRRef,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
) -> dict:
    """MoR's training forward, literally (2.1-2.4): first layer causal on all tokens; then

    expert: for r = 1..N_r, a = h . w_r on the raw residual of each candidate (all tokens at
    r = 1, else the previous selection), g = alpha sigmoid(a); per row the k_r =
    max(1, floor(c_r T)) largest g (equal g: the earlier position first) are selected; the
    block runs on them (among themselves); h <- h + g F(h) for them. BCE(a, selected) averaged
    over all candidates of the batch, summed over r, x aux_coeff.

    token: p = softmax(h W^T) per token, d = first argmax (0-based: d + 1 recursions),
    w = alpha p[d]; recursion r runs {d >= r} on the running x (F applied, ungated);
    out = h0 + w x. Balancing sum_r mean_t(p_r) * N_r * frac(d = r), z-loss
    mean (logsumexp)^2.

    Then the last layer causal on all, final norm, head, masked CE; loss = CE + router loss.
    Returns logits, lm_loss, router_loss, loss, ``selected`` (a list per recursion of the sorted
    (b, t) that ran it) and ``steps`` [B, T] (recursions run).
    """
    b_sz, n = tokens.shape
    last = cfg.num_layers - 1
    h0 = causal_forward(params, cfg, _embed_all(params, cfg, tokens), doc_ids, [0])
    h = {(b, t): h0[b, t] for b in range(b_sz) for t in range(n)}
    w_router = params["mor_router.weight"]
    selected: list[list[tuple[int, int]]] = []
    router_loss = torch.zeros((), dtype=DT)
    if spec.router == "expert":
        candidates = {b: list(range(n)) for b in range(b_sz)}
        for r in range(spec.num_recursion):
            k_r = max(1, math.floor(spec.capacity[r] * n))
            bce, count = torch.zeros((), dtype=DT), 0
            gate: dict[tuple[int, int], torch.Tensor] = {}
            chosen: list[tuple[int, int]] = []
            for b in range(b_sz):
                logit = {t: h[(b, t)] @ w_router[r] for t in candidates[b]}
                for t in candidates[b]:
                    gate[(b, t)] = spec.alpha * torch.sigmoid(logit[t])
                ranked = sorted(candidates[b], key=lambda t: (-float(gate[(b, t)].detach()), t))
                keep = sorted(ranked[:k_r])
                if spec.selection == "threshold":
                    keep = [t for t in candidates[b] if float(torch.sigmoid(logit[t].detach())) >= 0.5]
                for t in candidates[b]:
                    y = 1.0 if t in keep else 0.0
                    # BCE with logits: log(1 + e^a) - y a
                    bce = bce + F.softplus(logit[t]) - y * logit[t]
                    count += 1
                chosen += [(b, t) for t in keep]
                candidates[b] = keep
            router_loss = router_loss + bce / count
            out = _mor_block(params, cfg, {s: h[s] for s in chosen}, doc_ids)
            for s in chosen:
                h[s] = out[s] if spec.combine == "replace" else h[s] + gate[s] * out[s]
            selected.append(chosen)
        router_loss = spec.aux_coeff * router_loss
    else:
        nr = spec.num_recursion
        probs, depth = {}, {}
        lse_sq = torch.zeros((), dtype=DT)
        for s, hs in h.items():
            logits_s = w_router @ hs
            probs[s] = torch.softmax(logits_s, dim=0)
            depth[s] = int(torch.argmax(probs[s].detach()))
            lse_sq = lse_sq + torch.logsumexp(logits_s, dim=0) ** 2
        x = dict(h)
        for r in range(nr):
            chosen = sorted(s for s in x if depth[s] >= r)
            if not chosen:
                break
            out = _mor_block(params, cfg, {s: x[s] for s in chosen}, doc_ids)
            for s in chosen:
                x[s] = out[s]
            selected.append(chosen)
        for s in h:
            w = spec.alpha * probs[s][depth[s]]
            h[s] = x[s] if spec.combine == "replace" else h[s] + w * x[s]
        tokens_n = len(h)
        balance = torch.zeros((), dtype=DT)
        for r in range(nr):
            p_mean = sum(probs[s][r] for s in probs) / tokens_n
            f_r = nr * sum(1 for s in depth if depth[s] == r) / tokens_n
            balance = balance + p_mean * f_r
        router_loss = spec.bal_coeff * balance + spec.z_coeff * lse_sq / tokens_n
    hs = torch.stack([torch.stack([h[(b, t)] for t in range(n)]) for b in range(b_sz)])
    h_out = causal_forward(params, cfg, hs, doc_ids, [last])
    out = _normed_head(params, cfg, final_norm(params, cfg, h_out), labels, loss_mask)
    out["router_loss"] = router_loss
    out["loss"] = out["lm_loss"] + router_loss
    out["selected"] = selected
    out["steps"] = torch.tensor([[sum((b, t) in sel for sel in selected) for t in range(n)]
                                 for b in range(b_sz)])
    return out


def mor_looped(
    params: Params,
    cfg: RefConfig,
    num_recursion: int,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """A middle-cycle looped model: first layer, the block (layers 1..D) applied N_r times as
    independent causal passes over every token, last layer; final norm, head, CE."""
    h = causal_forward(params, cfg, _embed_all(params, cfg, tokens), doc_ids, [0])
    for _ in range(num_recursion):
        h = causal_forward(params, cfg, h, doc_ids, range(1, cfg.num_layers - 1))
    h = causal_forward(params, cfg, h, doc_ids, [cfg.num_layers - 1])
    return _normed_head(params, cfg, final_norm(params, cfg, h), labels, loss_mask)


METHODS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "vanilla": vanilla,
    "adaptive": adaptive,
    "latent_fixed": latent_fixed,
    "looped": looped,
    "pondering": pondering,
    "pause": pause,
    "ponderlm2": ponderlm2,
}


def run_reference(
    method: str,
    params: Params,
    cfg: RefConfig,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Dispatch to one method. Always returns ``logits`` [B, T, V], ``lm_loss`` and ``loss``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    if cfg.num_heads % cfg.num_kv_heads or cfg.hidden_size % cfg.num_heads:
        raise ValueError("hidden_size % num_heads and num_heads % num_kv_heads must be 0")
    return METHODS[method](params, cfg, tokens, labels, loss_mask, doc_ids)
