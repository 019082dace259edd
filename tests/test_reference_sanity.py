"""Sanity tests of the naive float64 oracle in tests/reference/naive.py (METHOD.md).

The oracle is checked against independent, vectorized re-implementations written here (full
matrix attention with an explicit boolean mask), against HF ``LlamaForCausalLM`` when
``transformers`` is installed, and against the degenerate-case identities of METHOD.md.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import require

try:
    from tests.reference.naive import RefConfig, random_params, run_reference
except ImportError:  # tests/ is not a package on sys.path: pytest put tests/ itself there
    from reference.naive import RefConfig, random_params, run_reference

DT = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}  # two float64 computations of the same math
EXACT = {"rtol": 0.0, "atol": 1e-12}  # the same ops in the same order

CFG = RefConfig(
    hidden_size=16,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    ffn_hidden_size=24,
    vocab_size=23,
    rope_theta=500.0,
    norm_eps=1e-6,
    embedding_multiplier=1.5,
    max_steps=3,
)
B, T = 2, 7


def make_batch(cfg: RefConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    loss_mask = torch.ones(B, T, dtype=DT)
    loss_mask[0, 0] = 0.0
    loss_mask[1, -2:] = 0.0
    labels[1, -1] = -100  # masked-out label that is not a valid index
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}


def two_doc_ids() -> torch.Tensor:
    doc = torch.zeros(B, T, dtype=torch.long)
    doc[0, 3:] = 1  # row 0: document 0 = positions 0..2, document 1 = positions 3..6
    doc[1, 5:] = 7
    return doc


# ---------------------------------------------------------------------------------------------
# independent vectorized Llama (full-matrix attention, explicit mask)
# ---------------------------------------------------------------------------------------------


def dense_stack(
    p: dict[str, torch.Tensor],
    cfg: RefConfig,
    x: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """x [B, N, H], pos [N] RoPE positions, mask [B, N, N] bool (query, key) -> last layer h."""
    bsz, n, _ = x.shape
    nh, nkv = cfg.num_heads, cfg.num_kv_heads
    hd = cfg.hidden_size // nh
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=DT) / hd))
    freqs = torch.outer(pos.to(DT), inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rms(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rot(v: torch.Tensor) -> torch.Tensor:  # v [B, heads, N, hd]
        half = torch.cat([-v[..., hd // 2 :], v[..., : hd // 2]], -1)
        return v * cos + half * sin

    h = x
    for i in range(cfg.num_layers):
        w = lambda name: p[f"layers.{i}.{name}.weight"]  # noqa: B023
        a = rms(h, w("input_layernorm"))
        q = F.linear(a, w("self_attn.q_proj")).view(bsz, n, nh, hd).transpose(1, 2)
        k = F.linear(a, w("self_attn.k_proj")).view(bsz, n, nkv, hd).transpose(1, 2)
        v = F.linear(a, w("self_attn.v_proj")).view(bsz, n, nkv, hd).transpose(1, 2)
        q, k = rot(q), rot(k)
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        s = s.masked_fill(~mask[:, None], float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(bsz, n, nh * hd)
        h = h + F.linear(o, w("self_attn.o_proj"))
        m = rms(h, w("post_attention_layernorm"))
        h = h + F.linear(F.silu(F.linear(m, w("mlp.gate_proj"))) * F.linear(m, w("mlp.up_proj")),
                         w("mlp.down_proj"))  # fmt: skip
    return h


def causal_mask(doc: torch.Tensor | None, n: int) -> torch.Tensor:
    m = torch.tril(torch.ones(n, n, dtype=torch.bool))[None].expand(B, n, n)
    if doc is not None:
        m = m & (doc[:, :, None] == doc[:, None, :])
    return m


def head(p: dict[str, torch.Tensor], cfg: RefConfig) -> torch.Tensor:
    return p["embed_tokens.weight"] if cfg.tie_embeddings else p["lm_head.weight"]


def fnorm(p: dict[str, torch.Tensor], cfg: RefConfig, h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * p["norm.weight"]


def dense_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none")
    return (ce * mask.flatten()).sum() / mask.sum()


def dense_vanilla(p, cfg, tokens, doc=None, inputs=None, passes=1):  # noqa: ANN001, ANN202
    x = p["embed_tokens.weight"][tokens] * cfg.embedding_multiplier if inputs is None else inputs
    n = x.shape[1]
    for _ in range(passes):
        x = dense_stack(p, cfg, x, torch.arange(n), causal_mask(doc, n))
    return x


def dense_latent(p, cfg, tokens, doc, use_router):  # noqa: ANN001, ANN202
    """Step-by-step over a flattened (step, t) sequence with an explicit (t, k, executed) mask."""
    k_max, h_sz = cfg.max_steps, cfg.hidden_size
    step_inputs = [p["embed_tokens.weight"][tokens] * cfg.embedding_multiplier]
    executed = [torch.ones(B, T, dtype=torch.bool)]
    reach = torch.ones(B, T, dtype=DT)
    zs = []
    for k in range(k_max):
        seq = torch.cat(step_inputs, 1)  # [B, (k+1)T, H]
        pos = torch.arange(T).repeat(k + 1)
        stp = torch.arange(k + 1).repeat_interleave(T)
        ex = torch.cat(executed, 1)
        m = (pos[None, :] <= pos[:, None]) & (stp[None, :] <= stp[:, None])
        m = m[None] & ex[:, None, :]
        if doc is not None:
            d = doc.repeat(1, k + 1)
            m = m & (d[:, :, None] == d[:, None, :])
        z = fnorm(p, cfg, dense_stack(p, cfg, seq, pos, m)[:, k * T :])
        zs.append(z)
        if k == k_max - 1:
            break
        if use_router:
            reach = reach * torch.sigmoid(z @ p["router.weight"][0] + p["router.bias"][0])
            cont = executed[-1] & (reach > cfg.tau)
        else:
            cont = executed[-1]
        step_inputs.append(torch.where(cont[..., None], z, torch.zeros(B, T, h_sz, dtype=DT)))
        executed.append(cont)
    steps = torch.stack(executed, -1).sum(-1)
    return torch.stack(zs, 2), torch.stack(executed, -1), steps


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("with_doc", [False, True])
def test_vanilla_matches_dense_llama(tie: bool, with_doc: bool) -> None:
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    p = random_params(cfg, seed=1, std=0.2)
    batch = make_batch(cfg)
    doc = two_doc_ids() if with_doc else None
    out = run_reference("vanilla", p, cfg, **batch, doc_ids=doc)
    logits = fnorm(p, cfg, dense_vanilla(p, cfg, batch["tokens"], doc)) @ head(p, cfg).T
    torch.testing.assert_close(out["logits"], logits, **TIGHT)
    lm = dense_ce(logits, batch["labels"], batch["loss_mask"])
    torch.testing.assert_close(out["lm_loss"], lm, **TIGHT)
    torch.testing.assert_close(out["loss"], lm, **TIGHT)
    # gradients w.r.t. params agree too
    names = [n for n in p if n.startswith(("layers.0", "embed", "norm", "lm_head"))]
    g_ref = torch.autograd.grad(out["loss"], [p[n] for n in names])
    g_dense = torch.autograd.grad(lm, [p[n] for n in names])
    for n, a, b in zip(names, g_ref, g_dense):
        torch.testing.assert_close(a, b, **TIGHT, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("tie", [False, True])
def test_vanilla_matches_hf_llama(tie: bool) -> None:
    transformers = require("transformers")
    cfg = dataclasses.replace(CFG, tie_embeddings=tie, embedding_multiplier=1.0)
    p = random_params(cfg, seed=2, std=0.2)
    kw = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": tie,
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": 64,
    }
    sig = inspect.signature(transformers.LlamaConfig.__init__).parameters
    if "rope_parameters" in sig:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        kw["rope_theta"] = cfg.rope_theta
    hf_cfg = transformers.LlamaConfig(**kw)
    hf_cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_cfg).to(DT).eval()
    sd = {
        (n if n == "lm_head.weight" else "model." + n): t.detach()
        for n, t in p.items()
        if not n.startswith(("router.", "pause_embeddings."))
    }
    res = model.load_state_dict(sd, strict=False)
    assert not res.unexpected_keys
    assert set(res.missing_keys) <= ({"lm_head.weight"} if tie else set())
    batch = make_batch(cfg)
    ref = run_reference("vanilla", p, cfg, **batch)["logits"]
    with torch.no_grad():
        hf = model(input_ids=batch["tokens"]).logits
    # HF keeps float32 islands in a float64 model (RoPE cos/sin, RMSNorm statistics, eager
    # softmax), so agreement is ~1e-7 absolute, not float64 round-off; logits here are O(1).
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ref.detach(), hf, rtol=1e-5, atol=1e-5)


def test_adaptive_k1_equals_vanilla() -> None:
    cfg = dataclasses.replace(CFG, max_steps=1)
    p = random_params(cfg, seed=3, std=0.2)
    batch = make_batch(cfg)
    van = run_reference("vanilla", p, cfg, **batch)
    ada = run_reference("adaptive", p, cfg, **batch)
    torch.testing.assert_close(ada["logits"], van["logits"], **TIGHT)
    torch.testing.assert_close(ada["loss"], van["loss"], **TIGHT)
    torch.testing.assert_close(ada["adaptive_loss"], torch.zeros((), dtype=DT), **EXACT)
    assert (ada["steps"] == 1).all()
    assert torch.isnan(ada["gates"]).all()
    torch.testing.assert_close(ada["exit"], torch.ones(B, T, 1, dtype=DT), **EXACT)
    torch.testing.assert_close(ada["reach"][..., 0], torch.ones(B, T, dtype=DT), **EXACT)
    torch.testing.assert_close(ada["reach"][..., 1], torch.zeros(B, T, dtype=DT), **EXACT)


@pytest.mark.parametrize("with_doc", [False, True])
def test_adaptive_tau0_open_router_equals_latent_fixed(with_doc: bool) -> None:
    cfg = dataclasses.replace(CFG, tau=0.0)
    p = random_params(cfg, seed=4, std=0.2, router_bias=30.0)
    batch = make_batch(cfg)
    doc = two_doc_ids() if with_doc else None
    ada = run_reference("adaptive", p, cfg, **batch, doc_ids=doc)
    fix = run_reference("latent_fixed", p, cfg, **batch, doc_ids=doc)
    assert (ada["steps"] == cfg.max_steps).all() and (fix["steps"] == cfg.max_steps).all()
    assert not torch.isnan(ada["z"]).any()
    torch.testing.assert_close(ada["z"], fix["z"], **EXACT)  # z^(k) per step
    # router ~open: exit mass ~all at K, so the mixed z^f ~ z^(K)
    torch.testing.assert_close(ada["logits"], fix["logits"], rtol=1e-9, atol=1e-9)
    # latent_fixed against the independent dense step-by-step implementation
    z_dense, _, _ = dense_latent(p, cfg, batch["tokens"], doc, use_router=False)
    torch.testing.assert_close(fix["z"], z_dense, **TIGHT)
    torch.testing.assert_close(fix["logits"], z_dense[:, :, -1] @ head(p, cfg).T, **TIGHT)
    torch.testing.assert_close(fix["loss"], fix["lm_loss"], **EXACT)


def _mixed_pruning_setup(seed: int = 5) -> tuple[RefConfig, dict, dict]:
    cfg = dataclasses.replace(CFG, max_steps=4, tau=0.3, adaptive_loss_beta=1.7)
    p = random_params(cfg, seed=seed, std=0.2, router_bias=1.5)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        p["router.weight"].copy_(torch.randn(1, cfg.hidden_size, generator=g, dtype=DT) * 0.6)
    return cfg, p, make_batch(cfg, seed=seed)


@pytest.mark.parametrize("with_doc", [False, True])
def test_adaptive_mixed_pruning(with_doc: bool) -> None:
    cfg, p, batch = _mixed_pruning_setup()
    doc = two_doc_ids() if with_doc else None
    out = run_reference("adaptive", p, cfg, **batch, doc_ids=doc)
    steps = out["steps"]
    assert len(steps.unique()) >= 3, f"test needs varied pruning, got steps {steps}"
    # exits sum to 1 and follow the reach/gate definitions
    torch.testing.assert_close(out["exit"].sum(-1), torch.ones(B, T, dtype=DT), **TIGHT)
    reach, gates, k_max = out["reach"], out["gates"], cfg.max_steps
    ks = torch.arange(1, k_max + 1)
    executed = ks[None, None, :] <= steps[..., None]
    assert torch.isnan(out["z"][~executed]).all() and not torch.isnan(out["z"][executed]).any()
    has_gate = executed & (ks[None, None, :] < k_max)
    assert torch.isnan(gates[~has_gate]).all() and not torch.isnan(gates[has_gate]).any()
    torch.testing.assert_close(reach[..., 1:][has_gate], (reach[..., :-1] * gates)[has_gate])
    # continue iff reach^(k+1) > tau and k < K (strict >); stop otherwise
    last_gate = steps < k_max
    nxt = reach.gather(-1, steps[..., None]).squeeze(-1)  # reach^(last_t + 1)
    assert (nxt[last_gate] <= cfg.tau).all()
    for k in range(1, k_max):
        ran = steps > k
        assert (reach[..., k][ran] > cfg.tau).all()
    # z^f and logits
    z0 = torch.nan_to_num(out["z"])
    zf = (out["exit"][..., None] * z0).sum(2)
    torch.testing.assert_close(out["z_final"], zf, **TIGHT)
    torch.testing.assert_close(out["logits"], zf @ head(p, cfg).T, **TIGHT)
    lm = dense_ce(out["logits"], batch["labels"], batch["loss_mask"])
    torch.testing.assert_close(out["lm_loss"], lm, **TIGHT)
    # L_adaptive = mean_t sum_{k < last_t} sg(p_target^(k))^beta reach^(k+1)
    probs = torch.softmax(z0 @ head(p, cfg).T, -1)
    pt = probs.gather(-1, batch["labels"].clamp(min=0)[:, :, None, None].expand(B, T, k_max, 1))
    pt = pt.squeeze(-1).detach()
    before_last = ks[None, None, :] < steps[..., None]
    terms = torch.where(before_last, pt**cfg.adaptive_loss_beta * reach[..., 1:], 0.0)
    la = (terms.sum(-1) * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    torch.testing.assert_close(out["adaptive_loss"], la, **TIGHT)
    torch.testing.assert_close(out["loss"], lm + cfg.adaptive_loss_weight * la, **TIGHT)
    # against the independent dense implementation of the masking / pruning rules
    z_dense, ex_dense, steps_dense = dense_latent(p, cfg, batch["tokens"], doc, use_router=True)
    assert torch.equal(steps_dense, steps)
    assert torch.equal(ex_dense, executed)
    torch.testing.assert_close(out["z"][executed], z_dense[executed], **TIGHT)
    # the loss is differentiable w.r.t. the router (through reach and exits)
    gw, gb = torch.autograd.grad(out["loss"], [p["router.weight"], p["router.bias"]])
    assert torch.isfinite(gw).all() and gw.abs().sum() > 0 and gb.abs().sum() > 0


def test_tau_above_every_reach_gives_one_step() -> None:
    cfg, p, batch = _mixed_pruning_setup()
    cfg = dataclasses.replace(cfg, tau=1.0)
    out = run_reference("adaptive", p, cfg, **batch)
    assert (out["steps"] == 1).all()
    van = run_reference("vanilla", p, cfg, **batch)
    torch.testing.assert_close(out["logits"], van["logits"], **TIGHT)
    torch.testing.assert_close(out["adaptive_loss"], torch.zeros((), dtype=DT), **EXACT)
    torch.testing.assert_close(out["exit"][..., 0], torch.ones(B, T, dtype=DT), **EXACT)


def test_latent_fixed_k1_equals_vanilla() -> None:
    cfg = dataclasses.replace(CFG, max_steps=1)
    p = random_params(cfg, seed=6, std=0.2)
    batch = make_batch(cfg)
    van = run_reference("vanilla", p, cfg, **batch)
    fix = run_reference("latent_fixed", p, cfg, **batch)
    torch.testing.assert_close(fix["logits"], van["logits"], **TIGHT)
    torch.testing.assert_close(fix["loss"], van["loss"], **TIGHT)


@pytest.mark.parametrize("method", ["looped", "pondering", "pause"])
def test_baselines_k1_equal_vanilla(method: str) -> None:
    cfg = dataclasses.replace(CFG, max_steps=1)
    p = random_params(cfg, seed=7, std=0.2)
    batch = make_batch(cfg)
    doc = two_doc_ids()
    van = run_reference("vanilla", p, cfg, **batch, doc_ids=doc)
    out = run_reference(method, p, cfg, **batch, doc_ids=doc)
    torch.testing.assert_close(out["logits"], van["logits"], **TIGHT)
    torch.testing.assert_close(out["loss"], van["loss"], **TIGHT)


@pytest.mark.parametrize("with_doc", [False, True])
def test_baselines_match_dense(with_doc: bool) -> None:
    cfg = dataclasses.replace(CFG, max_steps=3)
    p = random_params(cfg, seed=8, std=0.2)
    batch = make_batch(cfg)
    tok, doc = batch["tokens"], (two_doc_ids() if with_doc else None)
    w = head(p, cfg)
    e = p["embed_tokens.weight"][tok] * cfg.embedding_multiplier
    # looped: R raw repeats, norm once
    looped = fnorm(p, cfg, dense_vanilla(p, cfg, tok, doc, passes=cfg.max_steps)) @ w.T
    # pondering: e + softmax(norm(h) W^T) (E * sqrt(d)), the [prior] formula
    h = dense_vanilla(p, cfg, tok, doc)
    for _ in range(cfg.max_steps - 1):
        soft = torch.softmax(fnorm(p, cfg, h) @ w.T, -1)
        h = dense_vanilla(
            p,
            cfg,
            tok,
            doc,
            inputs=e + soft @ (p["embed_tokens.weight"] * math.sqrt(cfg.hidden_size)),
        )
    ponder = fnorm(p, cfg, h) @ w.T
    # pause: [e_t, p_1, .., p_{K-1}] per token, read at the last pause slot
    k = cfg.max_steps
    pz = p["pause_embeddings.weight"][None, None].expand(B, T, k - 1, cfg.hidden_size)
    x = torch.cat([e[:, :, None], pz], 2).reshape(B, T * k, cfg.hidden_size)
    pdoc = None if doc is None else doc.repeat_interleave(k, 1)
    hp = dense_stack(p, cfg, x, torch.arange(T * k), causal_mask(pdoc, T * k))
    pause = fnorm(p, cfg, hp[:, k - 1 :: k]) @ w.T
    for method, logits in [("looped", looped), ("pondering", ponder), ("pause", pause)]:
        out = run_reference(method, p, cfg, **batch, doc_ids=doc)
        torch.testing.assert_close(out["logits"], logits, **TIGHT, msg=lambda m: f"{method}: {m}")  # noqa: B023
        lm = dense_ce(logits, batch["labels"], batch["loss_mask"])
        torch.testing.assert_close(out["loss"], lm, **TIGHT)


@pytest.mark.parametrize(
    "method", ["vanilla", "adaptive", "latent_fixed", "looped", "pondering", "pause"]
)
def test_doc_ids_block_attention(method: str) -> None:
    cfg, p, batch = _mixed_pruning_setup(seed=9)
    doc = two_doc_ids()
    changed = dict(batch)
    tok = batch["tokens"].clone()
    tok[0, :3] = (tok[0, :3] + 1 + torch.arange(3)) % cfg.vocab_size  # edit document 0 of row 0
    changed["tokens"] = tok
    a = run_reference(method, p, cfg, **batch, doc_ids=doc)
    b = run_reference(method, p, cfg, **changed, doc_ids=doc)
    keys = ["logits"] + (
        ["z", "gates", "reach", "exit"] if method in ("adaptive", "latent_fixed") else []
    )
    for key in keys:
        # document 1 of row 0 and all of row 1 are unaffected
        torch.testing.assert_close(a[key][0, 3:], b[key][0, 3:], **EXACT, equal_nan=True)
        torch.testing.assert_close(a[key][1], b[key][1], **EXACT, equal_nan=True)
    if "steps" in a:
        assert torch.equal(a["steps"][0, 3:], b["steps"][0, 3:])
    assert (a["logits"][0, :3] - b["logits"][0, :3]).abs().max() > 1e-6  # the edit mattered
    # without doc_ids the edit does leak into later positions (the test is not vacuous)
    c = run_reference(method, p, cfg, **batch)
    d = run_reference(method, p, cfg, **changed)
    assert (c["logits"][0, 3:] - d["logits"][0, 3:]).abs().max() > 1e-9
