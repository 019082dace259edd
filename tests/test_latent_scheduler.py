"""The latent-step scheduler against the independent float64 definition (tests/reference).

The reference loops over steps and tokens and recomputes attention over exactly the allowed
(t, k) set; the scheduler caches K/V per step, compacts active tokens and batches rows.
Both run in float64.
"""


from __future__ import annotations

import math

import pytest
import torch

from tests.reference import RefConfig, run_reference

TOL = dict(rtol=1e-10, atol=1e-12)
VOCAB = 96
BASE = ["model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=48", f"model.vocab_size={VOCAB}",
        "model.embedding_multiplier=null", "latent.max_steps=4", "data.seq_length=12"]


@pytest.fixture(scope="module")
def ctx():
    from megatron_latentcot.config import ParallelConfig
    from megatron_latentcot.parallel import init_distributed

    return init_distributed(ParallelConfig())


def build(ctx, overrides, dtype=torch.float64, seed=0):
    from megatron_latentcot.config import load_config
    from megatron_latentcot.model.latent import LatentStepScheduler
    from megatron_latentcot.model.llama import LlamaStage, init_weights

    cfg = load_config(None, BASE + overrides)
    model = LlamaStage(cfg, ctx, VOCAB)
    init_weights(model, cfg.model, seed=seed)
    model.to(dtype)
    return cfg, model, LatentStepScheduler(model, cfg)


def batch(rows=3, seq=12, seed=0, docs=False):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (rows, seq + 1), generator=g)
    mask = torch.ones(rows, seq, dtype=torch.float64)
    mask[0, :2] = 0  # some tokens not counted
    mb = {"tokens": data[:, :-1], "labels": data[:, 1:], "loss_mask": mask}
    if docs:
        mb["doc_ids"] = (torch.arange(seq) >= seq // 3).long().repeat(rows, 1)
    return mb


def reference_run(cfg, model, mb):
    from megatron_latentcot.model.export import logical_state_dict

    params = {k: v.double().requires_grad_(True) for k, v in logical_state_dict(model).items()}
    m, lat = cfg.model, cfg.latent
    ref_cfg = RefConfig(
        hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_attention_heads,
        num_kv_heads=m.kv_heads, ffn_hidden_size=m.ffn_hidden_size, vocab_size=VOCAB,
        rope_theta=m.rope_theta, norm_eps=m.norm_eps,
        embedding_multiplier=model.embedding_multiplier, max_steps=lat.max_steps, tau=lat.tau,
        adaptive_loss_weight=lat.adaptive_loss_weight, adaptive_loss_beta=lat.adaptive_loss_beta,
        tie_embeddings=m.tie_embeddings, jacobi_iterations=lat.jacobi_iterations)
    out = run_reference(lat.method, params, ref_cfg, mb["tokens"], mb["labels"], mb["loss_mask"],
                        mb.get("doc_ids"))
    out["loss"].backward()
    return out, {k: v.grad for k, v in params.items()}


def ours_run(model, sched, mb):
    from megatron_latentcot.model.llama import logical_parameters

    model.zero_grad(set_to_none=True)
    out = sched.drive(sched.steps(mb, keep_logits=True), mb)
    out.loss.backward()
    grads = {name: lp.grad().clone() for name, lp in logical_parameters(model)
             if lp.grad() is not None}
    return out, grads


def assert_grads_close(ours, ref):
    assert set(ours) == set(k for k, v in ref.items() if v is not None)
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("docs", [False, True], ids=["packed", "doc-masked"])
@pytest.mark.parametrize("compact", [True, False], ids=["compact", "masked"])
def test_adaptive_equals_definition(ctx, docs, compact):
    cfg, model, sched = build(ctx, ["latent.method=adaptive", "latent.tau=0.3",
                                    "latent.adaptive_loss_beta=1.5",
                                    f"latent.compact={str(compact).lower()}"])
    mb = batch(docs=docs)
    ref, ref_grads = reference_run(cfg, model, mb)
    out, grads = ours_run(model, sched, mb)
    assert len(torch.unique(ref["steps"])) >= 3  # real pruning: several step counts
    assert torch.equal(out.steps.view_as(ref["steps"]), ref["steps"])
    for key in ("lm_loss", "adaptive_loss", "loss"):
        torch.testing.assert_close(getattr(out, key).double(), ref[key], **TOL)
    assert_grads_close(grads, ref_grads)


def test_latent_fixed_equals_definition(ctx):
    cfg, model, sched = build(ctx, ["latent.method=latent_fixed", "latent.max_steps=3"])
    mb = batch(docs=True)
    ref, ref_grads = reference_run(cfg, model, mb)
    out, grads = ours_run(model, sched, mb)
    assert (out.steps == 3).all()
    torch.testing.assert_close(out.loss.double(), ref["loss"], **TOL)
    assert_grads_close(grads, ref_grads)


def test_compaction_equals_masking_in_float32(ctx):
    """Same outputs and gradients, compacted or with halted tokens masked out."""
    results = []
    for compact in ("true", "false"):
        cfg, model, sched = build(ctx, ["latent.method=adaptive", "latent.tau=0.3",
                                        f"latent.compact={compact}"], dtype=torch.float32)
        results.append(ours_run(model, sched, batch()))
    (a, ga), (b, gb) = results
    assert torch.equal(a.steps, b.steps)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6, msg=name)


def test_max_steps_one_is_vanilla(ctx):
    losses = []
    for method in (["latent.method=vanilla"], ["latent.method=adaptive", "latent.max_steps=1"]):
        cfg, model, sched = build(ctx, method)
        out, _ = ours_run(model, sched, batch())
        losses.append(out.loss)
        assert (out.steps == 1).all()
    assert torch.equal(losses[0], losses[1])


def test_tau_zero_runs_every_step_and_high_tau_runs_one(ctx):
    _, _, sched = build(ctx, ["latent.method=adaptive", "latent.tau=0.0"])
    assert (sched.forward(batch()).steps == 4).all()
    _, _, sched = build(ctx, ["latent.method=adaptive", "latent.tau=0.99"])
    out = sched.forward(batch())
    assert (out.steps == 1).all()
    assert out.adaptive_loss.item() == 0.0


@pytest.mark.parametrize("names,weight", [
    (["router.weight", "router.bias"], 0.5),  # gates -> reach/exit mixing -> L_LM and L_adaptive
    (["norm.weight"], 0.0),  # z -> mixing -> L_LM (L_adaptive's p_target is stop-gradient)
], ids=["router", "final-norm"])
def test_gradcheck_router_mixing_and_losses(ctx, names, weight):
    """Finite differences through gates, reach/exit mixing, L_LM and L_adaptive."""
    from torch.func import functional_call

    cfg, model, sched = build(ctx, ["latent.method=adaptive", "latent.tau=0.3",
                                    "model.num_layers=1", "latent.max_steps=3",
                                    f"latent.adaptive_loss_weight={weight}",
                                    "latent.adaptive_loss_beta=1.5"])
    mb = batch(rows=2, seq=6)
    start = tuple(dict(model.named_parameters())[n].detach().clone() for n in names)

    def loss_of(*tensors):
        params = dict(zip(names, tensors))
        original = sched.stage
        sched.stage = _Bound(model, params, functional_call)
        try:
            return sched.forward(mb).loss
        finally:
            sched.stage = original

    inputs = tuple(t.requires_grad_(True) for t in start)
    assert torch.autograd.gradcheck(loss_of, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


class _Bound:
    """The stage with some parameters replaced by given tensors (for gradcheck)."""

    def __init__(self, model, params, functional_call):
        self._model, self._params, self._call = model, params, functional_call

    def __getattr__(self, name):
        attr = getattr(self._model, name)
        if name == "router" and "router.weight" in self._params:
            return lambda z: self._call(self._model.router, {
                "weight": self._params["router.weight"], "bias": self._params["router.bias"]}, (z,))
        if name == "final_norm" and "norm.weight" in self._params:
            return lambda x: self._call(self._model.norm, {"weight": self._params["norm.weight"]},
                                        (x,))
        return attr


def test_flops_fall_with_active_tokens(ctx):
    """Compaction turns pruned tokens into saved matmul FLOPs (PyTorch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, model, sched = build(ctx, ["latent.method=latent_fixed", "latent.max_steps=2"],
                              dtype=torch.float32)
    mb = batch(rows=4, seq=12)

    def counted(keep):
        from megatron_latentcot.model.router import Decision

        def decide(z, reach, k):
            if k == sched.max_steps:
                return Decision(reach, torch.zeros_like(reach), torch.zeros_like(reach).bool()), None
            cont = torch.zeros_like(reach, dtype=torch.bool)
            cont[::keep] = True  # every keep-th active token survives
            return Decision(torch.where(cont, 0.0, reach), reach, cont), None

        sched._decide = decide
        with FlopCounterMode(display=False) as fc:
            sched.forward(mb).loss.backward()
        return fc.get_total_flops()

    all_tokens, half = counted(1), counted(2)
    _, _, one_step = build(ctx, ["latent.method=vanilla"], dtype=torch.float32)
    with FlopCounterMode(display=False) as fc:
        one_step.forward(mb).loss.backward()
    step2_all, step2_half = all_tokens - fc.get_total_flops(), half - fc.get_total_flops()
    assert step2_all > 0
    assert abs(step2_half / step2_all - 0.5) < 0.05, (step2_half, step2_all)


def _tp_forward(tp: int, sp: bool = False, force: str = "") -> dict:
    from megatron.core import parallel_state

    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed, init_distributed

    overrides = ["latent.method=adaptive", "latent.tau=0.3", "train.micro_batch_size=3",
                 "train.global_batch_size=3",
                 f"parallel.tensor_model_parallel_size={tp}",
                 f"parallel.sequence_parallel={str(sp).lower()}"]
    ctx = init_distributed(load_config(None, BASE + overrides).parallel)
    cfg, model, sched = build(ctx, overrides)
    mb = batch(docs=True)
    if force == "first-half":  # only rows of the first half survive step 1
        mb["loss_mask"] = mb["loss_mask"].clone()
        original = sched._decide

        def decide(z, reach, k, _orig=original):
            from megatron_latentcot.model.router import Decision

            d, g = _orig(z, reach, k)
            if k == 1:
                slots = (torch.arange(36).chunk(tp)[ctx.tp_rank] if sp else torch.arange(36))
                keep = slots < 18
                return Decision(torch.where(keep, d.exit.new_zeros(()), reach), reach * 0.9 * keep,
                                keep), g
            return d, g

        sched._decide = decide
    elif force == "stop":  # nobody goes on after step 2
        original = sched._decide

        def decide(z, reach, k, _orig=original):
            from megatron_latentcot.model.router import route

            return (route(reach, None, 0.0), None) if k == 2 else _orig(z, reach, k)

        sched._decide = decide
    out = sched.forward(mb)
    out.loss.backward()
    grad = model.router.weight.grad.clone()
    if sp:  # partial per rank under SP (the optimizer all-reduces it)
        torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
    stats = sched.stats(out, mb)  # what the training log shows
    destroy_distributed()
    return {"steps": out.steps, "loss": out.loss.item(), "router_grad": grad,
            "counts": [r.live for r in out.records], "stats": stats}


@pytest.mark.parametrize("sp,force", [
    pytest.param(False, "", id="tp2"),
    pytest.param(True, "", id="tp2-sp"),
    pytest.param(True, "first-half", id="tp2-sp-unbalanced", marks=pytest.mark.slow),
    pytest.param(True, "stop", id="tp2-sp-stop", marks=pytest.mark.slow),
])
def test_tensor_parallel_matches_single_and_agrees_on_active_sets(sp, force):
    from tests.dist_utils import run_distributed

    (one,) = run_distributed(_tp_forward, 1, 1, False, force)
    two = run_distributed(_tp_forward, 2, 2, sp, force)
    for rank in two:  # identical active sets on both TP ranks, and equal to TP = 1
        assert torch.equal(rank["steps"], one["steps"])
        assert rank["counts"] == one["counts"]
        assert abs(rank["loss"] - one["loss"]) < 1e-12
        torch.testing.assert_close(rank["router_grad"], one["router_grad"], rtol=1e-9, atol=1e-12)
        # the logged metrics (gates of every shard, FLOPs without SP's padding slots)
        assert rank["stats"].keys() == one["stats"].keys()
        assert rank["stats"]["flops"] == one["stats"]["flops"]
        torch.testing.assert_close(rank["stats"], one["stats"], rtol=1e-10, atol=1e-12)
    if sp and force != "stop":  # some step's survivors do not split evenly: SP pads them
        assert any(c % 2 for c in one["counts"]), one["counts"]
    if force == "stop":
        assert one["steps"].max() == 2
    else:
        assert len(set(one["counts"])) > 1  # pruning happened


@pytest.mark.parametrize("docs", [False, True], ids=["packed", "doc-masked"])
@pytest.mark.parametrize("method", ["looped", "pondering", "pause"])
def test_baselines_equal_definition(ctx, method, docs):
    cfg, model, sched = build(ctx, [f"latent.method={method}", "latent.max_steps=3",
                                    "model.max_position_embeddings=64"])
    mb = batch(docs=docs)
    ref, ref_grads = reference_run(cfg, model, mb)
    out, grads = ours_run(model, sched, mb)
    torch.testing.assert_close(out.loss, ref["loss"], **TOL)
    assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("multiplier,scale,prior", [
    ("1.0", "sqrt_hidden", True),  # the paper-scale configs: E x 1 for tokens, E x sqrt(d) fed back
    ("null", "sqrt_hidden", True),
    (repr(math.sqrt(32)), "embedding_multiplier", True),  # the token scale, here equal to sqrt(d)
    ("null", "embedding_multiplier", False),  # E x sqrt(2.5 d): not the prior's formula
])
def test_pondering_soft_embedding_scale(ctx, multiplier, scale, prior):
    """METHOD.md [prior]: pass j+1 adds softmax(LMHead(h_j)) @ (E sqrt(d)) whatever the token
    embeddings' multiplier, as the reference computes it; latent.pondering_embedding_scale=
    embedding_multiplier scales E by model.embedding_multiplier instead."""
    cfg, model, sched = build(ctx, ["latent.method=pondering", "latent.max_steps=3",
                                    "model.max_position_embeddings=64",
                                    f"model.embedding_multiplier={multiplier}",
                                    f"latent.pondering_embedding_scale={scale}"])
    mb = batch(rows=2, seq=6)
    ref, _ = reference_run(cfg, model, mb)
    with torch.no_grad():
        loss = sched.forward(mb).loss
    assert torch.isclose(loss, ref["loss"].detach(), **TOL).item() == prior, (loss, ref["loss"])


@pytest.mark.parametrize("method", ["looped", "pondering", "pause", "latent_fixed"])
def test_one_step_baselines_are_vanilla(ctx, method):
    _, _, vanilla = build(ctx, ["latent.method=vanilla"])
    _, _, other = build(ctx, [f"latent.method={method}", "latent.max_steps=1"])
    assert torch.equal(vanilla.forward(batch()).loss, other.forward(batch()).loss)


@pytest.mark.parametrize("method", ["adaptive", "pause"])
def test_flex_backend_forward_equals_sdpa(ctx, method):
    """flex_attention (block mask from the rule) == SDPA (dense boolean mask), forward on CPU."""
    outs = []
    for backend in ("sdpa", "flex"):
        _, _, sched = build(ctx, [f"latent.method={method}", "latent.tau=0.3",
                                  "latent.max_steps=3", "model.max_position_embeddings=64",
                                  f"latent.attention_backend={backend}"], dtype=torch.float32)
        with torch.no_grad():
            outs.append(sched.forward(batch(docs=True)))
    assert torch.equal(outs[0].steps, outs[1].steps)
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=1e-5, atol=1e-6)


def test_visible_pairs_counts_the_mask():
    """The binary-search pair count equals the SDPA mask's count on random 2-D plans."""
    from megatron_latentcot.model.attention import _sdpa_layout, latent_plan, visible_pairs

    g = torch.Generator().manual_seed(0)
    rows, seq = 3, 10
    doc = torch.cumsum(torch.rand(rows, seq, generator=g) < 0.2, dim=1)
    slots = torch.arange(rows * seq)
    step2 = slots[torch.rand(rows * seq, generator=g) < 0.6]
    step3 = step2[torch.rand(step2.numel(), generator=g) < 0.5]
    keys = torch.cat([slots, step2, step3])
    for live in (None, torch.rand(keys.numel(), generator=g) < 0.8):
        plan = latent_plan(step3, keys, live, rows, seq, doc)
        _, q_valid, _, mask = _sdpa_layout(plan)
        assert visible_pairs(plan) == int((mask[:, 0] & q_valid[:, :, None]).sum())


def _baseline_tp(tp: int, method: str) -> float:
    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed, init_distributed

    overrides = [f"latent.method={method}", "latent.max_steps=3", "model.max_position_embeddings=64",
                 f"parallel.tensor_model_parallel_size={tp}"]
    ctx = init_distributed(load_config(None, BASE + overrides).parallel)
    _, _, sched = build(ctx, overrides)
    loss = sched.forward(batch(docs=True)).loss.item()
    destroy_distributed()
    return loss


@pytest.mark.parametrize("method", ["pondering", "pause", "looped", "ponderlm2"])
def test_baselines_tensor_parallel_equal_single(method):
    from tests.dist_utils import run_distributed

    (one,) = run_distributed(_baseline_tp, 1, 1, method)
    for loss in run_distributed(_baseline_tp, 2, 2, method):
        assert abs(loss - one) < 1e-12, (loss, one)
