"""``train.precision=bf16`` trains every method on CPU, with the code the GPU runs.

bf16 = autocast compute (the TP linears cast their own operands: ``llama._AutocastCast``) over
fp32 master weights, gradients, optimizer state, routing and losses; under FSDP2 the parameter
gathers are bf16 and the reduction fp32 (``optimizer.mixed_precision``). Each method trains
ITERS steps on one repeated batch (so the loss must fall) in fp32 and in bf16; the bf16 loss
must stay within GAP of the fp32 one at every step.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.dist_utils import run_distributed

VOCAB, SEQ, MBS, GBS, ITERS = 128, 16, 2, 4, 6
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=96", f"model.vocab_size={VOCAB}",
        f"data.seq_length={SEQ}", f"train.micro_batch_size={MBS}",
        f"train.global_batch_size={GBS}", "train.lr=1e-2", "train.min_lr=1e-3",
        "train.lr_warmup_iters=1", f"train.train_iters={ITERS}", "train.clip_grad=1.0",
        "model.embedding_multiplier=null"]
METHODS = {
    "vanilla": ["latent.method=vanilla"],
    "latent_fixed": ["latent.method=latent_fixed", "latent.max_steps=2"],
    "adaptive": ["latent.method=adaptive", "latent.max_steps=3", "latent.tau=0.3"],
    "looped": ["latent.method=looped", "latent.max_steps=2"],
    "pondering": ["latent.method=pondering", "latent.max_steps=2"],
    "pause": ["latent.method=pause", "latent.max_steps=2"],
    "ponderlm2": ["latent.method=ponderlm2", "latent.max_steps=2", "latent.jacobi_iterations=3"],
}
# Largest relative |loss_bf16 - loss_fp32| / loss_fp32 over the ITERS steps. Measured (torch
# 2.13 CPU, one process): vanilla 6.0e-4, latent_fixed 1.7e-3, adaptive 7.1e-4, looped 1.0e-3,
# pondering 6.4e-4, pause 6.4e-4, ponderlm2 (K 2, J 3) 3.8e-4; adaptive bf16 at TP2 vs one
# process bf16 5.9e-4 (vs fp32 3.0e-4), at FSDP2 DP2 (bf16 gathers, bf16 norm weights) 1.9e-3
# (vs fp32 1.8e-3). About 3x:
GAP = 5e-3
FALL = 0.8  # the last loss is below FALL x the first (measured 0.24-0.63 in both precisions)


def _microbatches(dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    data = torch.randint(0, VOCAB, (GBS, SEQ + 1), generator=g).chunk(dp_size)[dp_rank]
    return [{"tokens": d[:, :-1].contiguous(), "labels": d[:, 1:].contiguous(),
             "loss_mask": torch.ones(d.shape[0], SEQ)} for d in data.split(MBS)]


def _train(engine, ctx) -> list[float]:
    return [engine.train_step(_microbatches(ctx.dp_rank, ctx.dp_size))["lm_loss"]
            for _ in range(ITERS)]


def _dtypes_seen(engine) -> dict[str, set[torch.dtype]]:
    """Hooks recording the dtypes a TP linear's weight and output and the router's gate have
    inside the forward (FSDP2 swaps in its gathered parameters there)."""
    seen: dict[str, set[torch.dtype]] = {"qkv_weight": set(), "qkv_out": set(), "gate": set()}
    qkv = next(iter(engine.model.layers.values())).self_attn.qkv_proj

    def linear_hook(module, args, out):
        seen["qkv_weight"].add(module.weight.dtype)
        seen["qkv_out"].add(out[0].dtype)

    qkv.register_forward_hook(linear_hook)
    if hasattr(engine.model, "router"):
        engine.model.router.register_forward_hook(lambda m, a, out: seen["gate"].add(out.dtype))
    return seen


def _master_dtypes(engine) -> set[torch.dtype]:
    """Dtypes of the stored parameters and AdamW state (what checkpoints save)."""
    from megatron_latentcot.training.optimizer import _local

    dtypes = {_local(p).dtype for p in engine.model.parameters()}
    for state in engine.optimizer.optimizer.state.values():
        dtypes |= {_local(v).dtype for v in state.values() if torch.is_tensor(v) and v.dim()}
    return dtypes


def train_methods(methods: list[str], precisions: list[str], layout: list[str]) -> dict:
    """Every (method, precision) on this rank's share of the repeated batch."""
    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed, init_distributed
    from megatron_latentcot.training.loop import Engine

    ctx = init_distributed(load_config(None, TINY + layout).parallel)
    out = {"last_stage": ctx.is_last_stage}
    for method in methods:
        for precision in precisions:
            cfg = load_config(None, TINY + layout + METHODS[method]
                              + [f"train.precision={precision}"])
            engine = Engine(cfg, ctx, VOCAB)
            seen = _dtypes_seen(engine)
            losses = _train(engine, ctx)
            out[method, precision] = {"losses": losses, "master": _master_dtypes(engine), **seen}
    destroy_distributed()
    return out


@pytest.fixture(scope="module")
def single() -> dict:
    return run_distributed(train_methods, 1, list(METHODS), ["fp32", "bf16"], [])[0]


def _gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_in_bf16_close_to_fp32(single, method):
    fp32, bf16 = single[method, "fp32"], single[method, "bf16"]
    losses = bf16["losses"]
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < FALL * losses[0], losses
    assert 0 < _gap(losses, fp32["losses"]) < GAP, (losses, fp32["losses"])  # > 0: bf16 ran
    assert bf16["qkv_out"] == {torch.bfloat16} and fp32["qkv_out"] == {torch.float32}
    assert bf16["master"] == {torch.float32}  # master weights and AdamW state
    if method == "adaptive":
        assert bf16["gate"] == {torch.float32}  # routing stays fp32


@pytest.mark.parametrize("layout,label", [
    pytest.param(["parallel.tensor_model_parallel_size=2"], "tp2", id="tp2",
                 marks=pytest.mark.slow),
    pytest.param(["parallel.zero=fsdp2"], "dp2", id="dp2-fsdp2"),
])
def test_adaptive_bf16_on_two_processes(single, layout, label):
    """TP2 (megatron's TP linears and SP-free reductions in bf16) and FSDP2 DP2 (bf16 gathers,
    fp32 accumulation and reduce-scatter, fp32 master shards) stay close to one process."""
    for r in run_distributed(train_methods, 2, ["adaptive"], ["bf16"], layout):
        res = r["adaptive", "bf16"]
        assert res["master"] == {torch.float32}
        assert res["qkv_out"] == {torch.bfloat16}
        gathered = {torch.bfloat16} if label == "dp2" else {torch.float32}
        assert res["qkv_weight"] == gathered  # FSDP2 runs the forward on bf16 gathers
        if r["last_stage"]:
            assert res["gate"] == {torch.float32}
            assert _gap(res["losses"], single["adaptive", "bf16"]["losses"]) < GAP
            assert _gap(res["losses"], single["adaptive", "fp32"]["losses"]) < GAP


def test_fsdp2_internals_refuse_older_and_warn_on_newer_torch(monkeypatch):
    """The private reduce path runs only on torch versions whose FSDP2 internals it knows."""
    import warnings

    from megatron_latentcot.config import ConfigError
    from megatron_latentcot.training import fsdp_internals

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fsdp_internals.check_torch()  # the tested version: silent
    version = torch.torch_version.TorchVersion
    monkeypatch.setattr(torch, "__version__", version("2.12.1"))
    with pytest.raises(ConfigError, match="needs torch >= 2.13"):
        fsdp_internals.check_torch()
    monkeypatch.setattr(torch, "__version__", version("2.14.0"))
    with pytest.warns(UserWarning, match="tested on torch 2.13 only"):
        fsdp_internals.check_torch()


def test_routers_stay_fp32_under_fsdp2_bf16():
    """FSDP2's bf16 policy gathers every unit in bf16 except the routers (adaptive's and
    MoR's): routing decisions are made from fp32 weights."""
    from torch import nn

    from megatron_latentcot.model.mor import MoRRouter
    from megatron_latentcot.model.router import Router
    from megatron_latentcot.training.optimizer import mixed_precision

    assert mixed_precision(Router(8, 0.0, False), "bf16").param_dtype is None
    assert mixed_precision(MoRRouter(8, 3), "bf16").param_dtype is None
    assert mixed_precision(nn.Linear(8, 8), "bf16").param_dtype == torch.bfloat16
