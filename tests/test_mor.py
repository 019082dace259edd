"""Mixture-of-Recursions (``latent.method: mor``, docs/baselines_ponderlm2_mor.md 2, 3.2), float64.

The training forward (first layer, N_r routed recursions of the shared block over the selected
tokens only, last layer) against the independent reference (tests/reference/naive.py ``mor``):
loss, logits, gradients (router included) and routing decisions, expert- and token-choice, with
documents; TP = 2 equals one process; capacity 1 with ``combine: replace`` is a middle-cycle
looped model; FLOPs from the records equal ``flops.method_counts`` and PyTorch's counter.
"""

from __future__ import annotations

import pytest
import torch

from tests import test_latent_scheduler
from tests.inference_utils import decoded_flops_equal_forward
from tests.test_latent_scheduler import BASE, VOCAB, assert_grads_close, batch, build, ours_run
from tests.test_training import TINY, _train, data_overrides, sotu_data  # noqa: F401 (fixture)

ctx = test_latent_scheduler.ctx  # the one-process parallel context fixture

TOL = dict(rtol=1e-9, atol=1e-11)


def method(router: str, recursions: int = 3, layers: int = 8, *extra: str) -> list[str]:
    """L = 8, N_r = 3: a shared block of 2 layers (4 physical layers)."""
    return ["latent.method=mor", f"latent.max_steps={recursions}",
            f"mor.num_recursion={recursions}", f"mor.router={router}",
            f"model.num_layers={layers}", *extra]


def reference(cfg, model, mb, grads: bool = True) -> tuple[dict, dict]:
    from megatron_latentcot.config import mor_capacities
    from megatron_latentcot.model.export import logical_state_dict
    from megatron_latentcot.model.mor import alpha, physical_layers
    from tests.reference import RefConfig
    from tests.reference.naive import MoRRef, mor

    params = {k: v.double().requires_grad_(True) for k, v in logical_state_dict(model).items()}
    m = cfg.model
    ref_cfg = RefConfig(
        hidden_size=m.hidden_size, num_layers=physical_layers(cfg),
        num_heads=m.num_attention_heads, num_kv_heads=m.kv_heads,
        ffn_hidden_size=m.ffn_hidden_size, vocab_size=VOCAB, rope_theta=m.rope_theta,
        norm_eps=m.norm_eps, embedding_multiplier=model.embedding_multiplier,
        tie_embeddings=m.tie_embeddings)
    spec = MoRRef(cfg.mor.num_recursion, cfg.mor.router, tuple(mor_capacities(cfg.mor)),
                  alpha(cfg), cfg.mor.aux_coeff, cfg.mor.bal_coeff, cfg.mor.z_coeff,
                  cfg.mor.combine, cfg.mor.expert_selection)
    out = mor(params, ref_cfg, spec, mb["tokens"], mb["labels"], mb["loss_mask"],
              mb.get("doc_ids"))
    if grads:
        out["loss"].backward()
    return out, {k: v.grad for k, v in params.items()}


@pytest.mark.parametrize("router,docs,extra", [
    ("expert", False, ()),
    ("expert", True, ("mor.capacity=[0.9, 0.5, 0.25]", "mor.aux_coeff=0.3")),
    ("token", False, ("mor.z_coeff=0.01",)),
    ("token", True, ("mor.alpha=0.7", "mor.bal_coeff=0.5")),
], ids=["expert", "expert-doc-masked", "token", "token-doc-masked"])
def test_training_forward_equals_definition(ctx, router, docs, extra):
    """Routing decisions identical (the recursions each token ran determine the nested
    selections), loss, router loss, logits and every gradient (router's through g / w)."""
    cfg, model, sched = build(ctx, method(router, 3, 8, *extra), seed=1)
    with torch.no_grad():  # a router that actually discriminates between tokens
        model.mor_router.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    mb = batch(rows=2, seq=7, docs=docs)
    ref, ref_grads = reference(cfg, model, mb)
    out, grads = ours_run(model, sched, mb)
    assert torch.equal(out.steps.view_as(ref["steps"]), ref["steps"])
    assert len(torch.unique(ref["steps"])) >= 3, ref["steps"]  # real routing: several depths
    torch.testing.assert_close(out.adaptive_loss, ref["router_loss"], **TOL)
    torch.testing.assert_close(out.loss, ref["loss"], **TOL)
    torch.testing.assert_close(out.logits.view_as(ref["logits"]), ref["logits"], **TOL)
    assert_grads_close(grads, ref_grads)
    assert ref_grads["mor_router.weight"].abs().sum() > 0
    assert len(out.records) == 2 + len(ref["selected"])
    for record, chosen in zip(out.records[1:-1], ref["selected"]):
        assert record.tokens == len(chosen)


def test_expert_capacity_per_row_and_ties_by_position(ctx):
    """k_r = max(1, floor(c_r T)) tokens per row; with a zero router every gate ties, and the
    earliest positions are kept."""
    cfg, model, sched = build(ctx, method("expert", 3, 5))
    with torch.no_grad():
        model.mor_router.weight.zero_()
        out = sched.forward(batch(rows=2, seq=7))
    # T = 7, c = (1, 2/3, 1/3): k = 7, 4, 2
    want = torch.tensor([3, 3, 2, 2, 1, 1, 1]).repeat(2)
    assert torch.equal(out.steps, want)
    assert [r.tokens for r in out.records] == [14, 14, 8, 4, 14]


def test_capacity_one_with_replace_is_a_middle_cycle_looped_model(ctx):
    """Every token through every recursion and h <- F(h): the first layer, the block N_r times
    over all tokens, the last layer (the reference's ``mor_looped``)."""
    from tests.reference.naive import mor_looped

    cfg, model, sched = build(ctx, method("expert", 3, 8, "mor.capacity=[1, 1, 1]",
                                          "mor.combine=replace"))
    mb = batch(rows=2, seq=6, docs=True)
    ref, _ = reference(cfg, model, mb, grads=False)
    from megatron_latentcot.model.export import logical_state_dict

    params = {k: v.double() for k, v in logical_state_dict(model).items()}
    from tests.reference import RefConfig

    m = cfg.model
    ref_cfg = RefConfig(hidden_size=m.hidden_size, num_layers=4, num_heads=m.num_attention_heads,
                        num_kv_heads=m.kv_heads, ffn_hidden_size=m.ffn_hidden_size,
                        vocab_size=VOCAB, embedding_multiplier=model.embedding_multiplier)
    looped = mor_looped(params, ref_cfg, 3, mb["tokens"], mb["labels"], mb["loss_mask"],
                        mb["doc_ids"])
    with torch.no_grad():
        out = sched.drive(sched.steps(mb, keep_logits=True), mb)
    torch.testing.assert_close(out.logits.view_as(looped["logits"]), looped["logits"], **TOL)
    torch.testing.assert_close(out.lm_loss, looped["lm_loss"], **TOL)
    assert (out.steps == 3).all()
    # the weighted combine is not the looped model (the literal statement is false)
    cfg_w, model_w, sched_w = build(ctx, method("expert", 3, 8, "mor.capacity=[1, 1, 1]"))
    with torch.no_grad():
        weighted = sched_w.forward(mb)
    assert (weighted.lm_loss - looped["lm_loss"]).abs() > 1e-6


def test_physical_layers_and_routers(ctx):
    """floor((L-2)/N_r) shared layers: L = 24, N_r = 3 -> 7 (2 + 7 physical), N_r = 2 -> 11;
    expert: one 1-output router per recursion, token: one N_r-output router."""
    from megatron_latentcot.config import load_config
    from megatron_latentcot.model.mor import layer_groups, physical_layers

    for n_r, depth in ((3, 7), (2, 11), (4, 5)):
        cfg = load_config(None, BASE + method("expert", n_r, 24))
        assert physical_layers(cfg) == 2 + depth
        assert layer_groups(cfg) == ((0,), tuple(range(1, depth + 1)), (depth + 1,))
    cfg, model, _ = build(ctx, method("token", 3, 8))
    assert sorted(model.layers) == ["0", "1", "2", "3"]
    assert tuple(model.mor_router.weight.shape) == (3, 32)


def _tp_forward(tp: int, router: str) -> tuple[float, list[int]]:
    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed, init_distributed

    overrides = method(router, 3, 8, "model.max_position_embeddings=64",
                       f"parallel.tensor_model_parallel_size={tp}")
    ctx = init_distributed(load_config(None, BASE + overrides).parallel)
    _, model, sched = build(ctx, overrides, seed=1)
    with torch.no_grad():
        model.mor_router.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    out = sched.forward(batch(docs=True))
    out.loss.backward()
    grad = model.mor_router.weight.grad.clone()
    destroy_distributed()
    return out.loss.item(), out.steps.tolist(), grad


@pytest.mark.parametrize("router", ["expert", "token"])
def test_tensor_parallel_equals_single(router):
    """TP = 2 (routers replicated): the same routing, loss and router gradient as one process."""
    from tests.dist_utils import run_distributed

    (one,) = run_distributed(_tp_forward, 1, 1, router)
    for loss, steps, grad in run_distributed(_tp_forward, 2, 2, router):
        assert steps == one[1]
        assert abs(loss - one[0]) < 1e-12, (loss, one[0])
        torch.testing.assert_close(grad, one[2], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("router", ["expert", "token"])
def test_flops_from_the_records_equal_the_analytic_counts_and_the_counter(ctx, router):
    """The records' counts == flops.method_counts("mor") (expert: exactly, per row; token: at
    its measured depths), and the formula's matmuls == PyTorch's FLOP counter exactly, its
    attention <= the counter's dense padded count."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_latentcot import flops
    from megatron_latentcot.config import mor_base_depth, mor_capacities
    from tests.test_flops import CPU_ATTENTION, CPU_SDPA, CPU_SDPA_BWD

    rows, seq = 3, 9
    cfg, model, sched = build(ctx, method(router, 3, 8), dtype=torch.float32)
    mb = batch(rows=rows, seq=seq)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as fc:
        out = sched.forward(mb)
        out.loss.backward()
    got = sched.counts(out)
    depth = mor_base_depth(8, 3)
    if router == "expert":
        want = flops.method_counts("mor", seq, 3, base_depth=depth,
                                   capacity=mor_capacities(cfg.mor))
        assert got.step_tokens == [rows * n for n in want.step_tokens]
        assert got.step_pairs == [rows * n for n in want.step_pairs]
        # routers on the candidates: T, n_1, n_2
        assert got.router_tokens == rows * want.router_tokens == rows * (seq + 9 + 6)
    else:  # data-dependent depths: the analytic form at the measured depth distribution
        dist = torch.bincount(out.steps - 1, minlength=3).double() / (rows * seq)
        want = flops.method_counts("mor", seq, 3, base_depth=depth, dist=dist.tolist())
        assert got.step_tokens == pytest.approx([rows * n for n in want.step_tokens])
        assert got.router_tokens == rows * want.router_tokens
    assert got.step_layers == want.step_layers == [1, depth, depth, depth, 1]
    assert got.head_tokens == rows * want.head_tokens
    m = cfg.model
    counts = fc.get_flop_counts()["Global"]
    counter_attention = counts.get(CPU_SDPA, 0) + counts.get(CPU_SDPA_BWD, 0)
    formula = sched.stats(out, mb)["flops"]
    formula_attention = 3 * sum(r.layers * flops.attention_flops(m, r.pairs)
                                for r in out.records)
    assert formula - formula_attention == fc.get_total_flops() - counter_attention
    assert 0 < formula_attention <= counter_attention


def test_config_errors_and_layout_refusals():
    from megatron_latentcot.config import ConfigError, load_config

    for overrides, field in (
            (["latent.max_steps=4"], "latent.max_steps"),
            (["mor.router=bogus"], "mor.router"),
            (["mor.capacity=[1, 0.5]"], "mor.capacity"),
            (["mor.capacity=[0.5, 1, 0.2]"], "mor.capacity"),
            (["mor.kv_sharing=true"], "mor.kv_sharing"),
            (["mor.combine=mean"], "mor.combine"),
            (["model.num_layers=4"], "model.num_layers"),
            (["parallel.pipeline_model_parallel_size=2"], "pipeline"),
            (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
             "sequence_parallel")):
        with pytest.raises(ConfigError, match=field):
            load_config(None, BASE + method("expert") + overrides)


@pytest.mark.parametrize("router", ["token", "expert"])
def test_decoding_equals_the_teacher_forced_forward(router):
    """Token-choice is causal as trained; expert-choice decodes by sigmoid(a) >= 0.5 and equals
    the training forward run with ``mor.expert_selection: threshold``. One token at a time, the
    whole prompt, or chunks: the same logits and recursions per token (the decoder's streams:
    first layer, one per recursion, last layer)."""
    from megatron_latentcot.inference.decoder import training_forward
    from tests.test_generate import build as build_generate
    from tests.test_generate import decode_in_chunks, tokens

    model = build_generate("mor", extra=method(router, 3, 8, "mor.expert_selection=threshold")[1:],
                           seed=1)
    with torch.no_grad():
        model.stage.mor_router.weight.normal_(0.0, 0.5,
                                              generator=torch.Generator().manual_seed(2))
    seq = 8
    toks = tokens(2, seq)
    tf = training_forward(model.scheduler, toks)
    assert len(torch.unique(tf.steps)) >= 2, tf.steps  # real routing
    for chunks in ([1] * seq, [seq], [3, 5]):
        logits, steps = decode_in_chunks(model, toks, chunks)
        assert (logits - tf.logits).abs().max().item() < 1e-10, chunks
        assert torch.equal(steps, tf.steps), chunks


@pytest.mark.parametrize("router", ["token", "expert"])
def test_decoder_flops_equal_the_training_forward_flops(router):
    """Prefill, and the one-token calls summed, cost the (threshold / token-choice) training
    forward's forward FLOPs of the same tokens: each recursion's query sees the same keys."""
    from tests.test_generate import build as build_generate
    from tests.test_generate import tokens

    model = build_generate("mor", torch.float32, seed=1, extra=method(
        router, 3, 8, "mor.expert_selection=threshold")[1:])
    with torch.no_grad():
        model.stage.mor_router.weight.normal_(0.0, 0.5,
                                              generator=torch.Generator().manual_seed(2))
    decoded_flops_equal_forward(model, tokens(2, 8))


def test_threshold_training_forward_equals_definition(ctx):
    """``expert_selection: threshold`` (each token continues iff sigmoid(a) >= 0.5, nested):
    loss, logits, gradients and decisions as the reference's threshold rule."""
    cfg, model, sched = build(ctx, method("expert", 3, 8, "mor.expert_selection=threshold"),
                              seed=1)
    with torch.no_grad():
        model.mor_router.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    mb = batch(rows=2, seq=7, docs=True)
    ref, ref_grads = reference(cfg, model, mb)
    out, grads = ours_run(model, sched, mb)
    assert torch.equal(out.steps.view_as(ref["steps"]), ref["steps"])
    assert len(torch.unique(ref["steps"])) >= 3, ref["steps"]
    torch.testing.assert_close(out.loss, ref["loss"], **TOL)
    torch.testing.assert_close(out.logits.view_as(ref["logits"]), ref["logits"], **TOL)
    assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("router", ["expert", "token"])
def test_loss_falls_on_real_text(sotu_data, tmp_path, router):  # noqa: F811
    from tests.dist_utils import run_distributed

    result = run_distributed(_train, 1, TINY + data_overrides(sotu_data) + method(
        router, 2, 4) + ["train.train_iters=30", f"train.save={tmp_path}"])[0]
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses


@pytest.mark.parametrize("router", ["expert", "token"])
def test_flex_backend_equals_sdpa(ctx, router):
    """The GPU attention path (flex, block mask from the packed selection) gives the same
    forward as SDPA's boolean mask, with documents (flex runs forward-only on CPU)."""
    results, mb = [], batch(rows=2, seq=7, docs=True)
    for backend in ("sdpa", "flex"):
        cfg, model, sched = build(ctx, method(router, 3, 8, f"latent.attention_backend={backend}"),
                                  seed=1)
        with torch.no_grad():
            model.mor_router.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
            results.append(sched.drive(sched.steps(mb, keep_logits=True), mb))
    sdpa, flex = results
    assert torch.equal(sdpa.steps, flex.steps)
    torch.testing.assert_close(flex.logits, sdpa.logits, rtol=1e-9, atol=1e-11)


def test_bf16_autocast_trains_with_fp32_routing(ctx):
    """Under bf16 autocast (the GPU recipe, run on CPU): the routers' logits stay fp32, the
    forward and backward run, and the loss stays within bf16's error of fp32's."""
    cfg, model, sched = build(ctx, method("expert", 3, 8), dtype=torch.float32, seed=1)
    with torch.no_grad():
        model.mor_router.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    mb = batch(rows=2, seq=7)
    with torch.no_grad():
        fp32_loss = sched.forward(mb).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.mor_router(torch.randn(3, 1, 32))
        out = sched.forward(mb)
    assert logits.dtype == torch.float32
    out.loss.backward()
    assert torch.isfinite(model.mor_router.weight.grad).all()
    assert model.mor_router.weight.grad.abs().sum() > 0
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(fp32_loss, rel=2e-2)
