"""The planner (megatron_latentcot.plan) against the code it plans for.

- Parameters: the planner's per-stage names and shapes equal LlamaStage's, for every example
  config (built on the meta device) and for small configs covering GQA, tied embeddings, the
  adaptive router, pause embeddings and pipeline stages; TP / FSDP2 shards in a 2-process run.
- Memory: activations against the bytes autograd saves; the peak against CPU allocations.
- FLOPs against what the scheduler reports for a real forward; time per iteration by hand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from megatron_latentcot import plan as P
from megatron_latentcot.config import load_config
from megatron_latentcot.flops import vanilla_train_flops

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "examples" / "configs").glob("*.yaml"))
SCALED = [c for c in CONFIGS if not c.name.startswith("tiny")]
METHODS = ("vanilla", "adaptive", "latent_fixed", "looped", "pause", "pondering",
           "ponderlm2", "mor")
# K_max of the paper-scale configs: 4, except methods whose authors use another (one line each)
SCALED_MAX_STEPS = {"ponderlm2": 2,  # the authors' one latent thought
                    "mor": 3}  # the authors' N_r
V = 256
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=160", f"model.vocab_size={V}",
         "data.seq_length=64", "model.max_position_embeddings=256"]


@pytest.fixture(scope="module")
def ctx():
    from megatron_latentcot.config import ParallelConfig
    from megatron_latentcot.parallel import init_distributed

    return init_distributed(ParallelConfig())


def _small(overrides: list[str], rows: int = 2):
    return load_config(None, SMALL + overrides + [f"train.micro_batch_size={rows}",
                                                  f"train.global_batch_size={rows}"])


def _batch(cfg, rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    seq = cfg.data.seq_length
    data = torch.randint(0, V, (rows, seq + 1), generator=torch.Generator().manual_seed(seed))
    return {"tokens": data[:, :-1], "labels": data[:, 1:], "loss_mask": torch.ones(rows, seq)}


# -- configs -----------------------------------------------------------------------------------

def test_there_is_a_config_per_scale_and_method():
    names = {c.stem for c in SCALED}
    assert names == {f"{s}_{m}" for s in ("410m", "1.4b", "7b") for m in METHODS}


@pytest.mark.parametrize("path", SCALED, ids=lambda p: p.stem)
def test_scaled_configs_load_and_fit(path):
    """Every paper-scale config validates, matches METHOD.md's shapes and fits its target layout
    (410M / 1.4B: one 80 GiB GPU; 7B: 4 nodes x 8 GPUs)."""
    cfg = load_config(path)
    scale, method = path.stem.split("_", 1)
    m, lat, tr = cfg.model, cfg.latent, cfg.train
    shape = {"410m": (24, 1024, 16, 2752, 2048), "1.4b": (24, 2048, 32, 5504, 2048),
             "7b": (32, 4096, 32, 11008, 4096)}[scale]
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size,
            cfg.data.seq_length) == shape
    assert m.vocab_size == 50304 and not m.tie_embeddings and lat.method == method
    assert (tr.adam_beta1, tr.adam_beta2, tr.weight_decay, tr.precision) == (0.9, 0.95, 0.1, "bf16")
    assert tr.global_batch_size == 256 and tr.min_lr == pytest.approx(tr.lr / 10)
    assert tr.lr_warmup_iters == pytest.approx(0.02 * tr.train_iters)
    if scale != "7b":
        assert tr.lr == {"410m": 3e-4, "1.4b": 2e-4}[scale] and tr.train_iters == 50_000
    if method != "vanilla":
        assert lat.max_steps == SCALED_MAX_STEPS.get(method, 4)
    if method == "adaptive":
        assert (lat.tau, lat.adaptive_loss_weight, lat.adaptive_loss_beta) == (0.1, 0.1, 1.0)
        assert m.embedding_multiplier is None
    assert m.max_position_embeddings >= cfg.data.seq_length * (lat.max_steps if method == "pause"
                                                                else 1)
    world = 32 if scale == "7b" else 1
    plan = P.make_plan(cfg, P.make_layout(cfg, world, gpus_per_node=8 if world > 1 else None),
                       50304)
    assert plan.fits, plan.problems
    # distinct parameters by an independent closed form (Llama, untied, no biases)
    d, f, L = m.hidden_size, m.ffn_hidden_size, m.num_layers
    if method == "mor":  # middle-cycle: first, floor((L-2)/N_r) shared, last
        L = 2 + (L - 2) // 3
    expected = L * (4 * d * d + 3 * d * f + 2 * d) + 2 * 50304 * d + d
    expected += {"adaptive": d + 1, "pause": 3 * d, "mor": 3 * d}.get(method, 0)
    assert plan.total_params == expected


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_param_count_equals_the_model_on_meta(ctx, path):
    """LlamaStage built on the meta device (TP = 1: one process) has the planned parameters."""
    from megatron_latentcot.model.llama import LlamaStage

    cfg = load_config(path, ["parallel.tensor_model_parallel_size=1"])
    vocab = cfg.model.vocab_size or 8192
    with torch.device("meta"):
        model = LlamaStage(cfg, dataclasses.replace(ctx, device=torch.device("meta")), vocab)
    real = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert real == P.stage_param_shapes(cfg, vocab, 1, 0)
    assert sum(p.numel() for p in model.parameters()) == P.total_params(cfg, vocab)


SMALL_VARIANTS = {
    "vanilla": [],
    "gqa-adaptive": ["latent.method=adaptive", "model.num_query_groups=1"],
    "mha-tied": ["model.num_query_groups=null", "model.tie_embeddings=true"],
    "pause": ["latent.method=pause", "latent.max_steps=3"],
    "looped": ["latent.method=looped"],
    "uneven-ffn": ["model.ffn_hidden_size=100", "model.num_layers=3"],
}


ONE_STAGE_ONLY = ("mha-tied", "pause")  # config validation refuses them with PP > 1


@pytest.mark.parametrize("variant,pp", [
    pytest.param(v, pp, id=f"{v}-{pp}") for v in SMALL_VARIANTS for pp in (1, 2, 3)
    if pp == 1 or v not in ONE_STAGE_ONLY])
def test_param_shapes_per_stage_equal_the_model(ctx, variant, pp):
    """Per pipeline stage: embedding/pause on the first, norm/head/router on the last."""
    from megatron_latentcot.model.llama import LlamaStage

    layers = ["model.num_layers=6", "parallel.pipeline_layers=[1,2,3]"] if pp == 3 else \
        ["model.num_layers=4"]
    cfg = _small(SMALL_VARIANTS[variant] + layers + [f"parallel.pipeline_model_parallel_size={pp}"])
    total = 0
    for rank in range(pp):
        stage_ctx = dataclasses.replace(ctx, pp_rank=rank, pp_size=pp)
        model = LlamaStage(cfg, stage_ctx, V)
        real = {n: tuple(p.shape) for n, p in model.named_parameters()}
        assert real == P.stage_param_shapes(cfg, V, 1, rank)
        total += sum(p.numel() for p in model.parameters())
    assert total == P.total_params(cfg, V)


# -- memory ------------------------------------------------------------------------------------

def saved_activation_bytes(model, scheduler, mb: dict, bf16: bool):
    """Bytes of the distinct storages autograd saves for backward in one forward, parameters
    excluded: the activation memory a micro-batch holds until its backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # bf16 on CPU: the TP linears save a bf16 copy of their weight per call, where CUDA (what
    # the planner models) saves the fp32 parameter itself (model.llama._AutocastCast)
    weight_copies = {tuple(p.shape) for p in model.parameters()} if bf16 else set()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if t.dtype == torch.bfloat16 and tuple(t.shape) in weight_copies:
            return t
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        out = scheduler.forward(mb)
    return sum(seen.values()), out


ACT_CASES = {
    "vanilla": [],
    "vanilla-docs": ["data.reset_attention_mask=true"],
    "latent_fixed": ["latent.method=latent_fixed"],
    "adaptive-all": ["latent.method=adaptive", "latent.tau=0.0"],
    "adaptive-pruned": ["latent.method=adaptive", "latent.tau=0.2"],
    "adaptive-docs": ["latent.method=adaptive", "latent.tau=0.2", "data.reset_attention_mask=true"],
    "looped": ["latent.method=looped"],
    "pondering": ["latent.method=pondering"],
    "pause": ["latent.method=pause"],
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", ACT_CASES, ids=str)
def test_activation_estimate_matches_saved_tensors(ctx, case, precision):
    """Measured: the bytes of every distinct non-parameter storage autograd saves during one
    forward of a micro-batch (saved-tensor hooks; CPU, SDPA backend; bf16 = CPU autocast).
    Planned: ``activation_bytes(...).saved`` for the same micro-batch and the active-token
    counts the scheduler really ran. Within 10% (the model follows the ops one by one)."""
    from megatron_latentcot.model.latent import LatentStepScheduler
    from megatron_latentcot.model.llama import LlamaStage, init_weights

    rows = 2
    cfg = _small(ACT_CASES[case] + [f"train.precision={precision}"], rows)
    model = LlamaStage(cfg, ctx, V)
    init_weights(model, cfg.model, 0)
    mb = _batch(cfg, rows)
    if cfg.data.reset_attention_mask:
        mb["doc_ids"] = (torch.arange(cfg.data.seq_length) >= 21).long().repeat(rows, 1)
    measured, out = saved_activation_bytes(model, LatentStepScheduler(model, cfg), mb,
                                           bf16=precision == "bf16")
    n = rows * cfg.data.seq_length
    fractions = None
    if cfg.latent.method == "adaptive":  # steps nobody reached ran no token
        fractions = [r.tokens / n for r in out.records]
        fractions += [0.0] * (cfg.latent.max_steps - len(fractions))
    estimate = P.activation_bytes(cfg, V, 1, 0, rows, fractions).saved
    assert estimate == pytest.approx(measured, rel=0.10), (estimate, measured)


def _profiled_peak(fn) -> int:
    """Peak bytes of CPU tensor allocations made while ``fn`` runs, relative to its start
    (torch.profiler's allocation tracking: the "Total Allocated" of its memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    mem = [e["args"] for e in events if e.get("name") == "[memory]"]
    base = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(e["Total Allocated"] for e in mem) - base


PEAK_CASES = {
    "vanilla": [],
    "latent_fixed": ["latent.method=latent_fixed"],
    "adaptive": ["latent.method=adaptive", "latent.tau=0.0"],
    "pondering": ["latent.method=pondering"],
    "pause": ["latent.method=pause"],
}


@pytest.mark.parametrize("recompute", [False, True], ids=["no-recompute", "recompute"])
@pytest.mark.parametrize("case", PEAK_CASES, ids=str)
def test_peak_memory_matches_cpu_allocations(ctx, case, recompute):
    """Measured on CPU, fp32, one GPU's worth (world of one):

    - static: the bytes of the parameters and AdamW's states after one real step, compared
      exactly with the planner's weights + states;
    - peak: static + the peak of CPU tensor allocations during the forward and backward of the
      next iteration (torch.profiler memory events, ``_profiled_peak``), compared with the
      planner's backward-phase peak within 20%.
    """
    from megatron_latentcot.training.loop import Engine

    rows = 4
    cfg = _small(PEAK_CASES[case] + [f"train.recompute={str(recompute).lower()}"], rows)
    engine = Engine(cfg, ctx, V)
    mb = _batch(cfg, rows)
    engine.train_step([mb])  # creates AdamW's states
    static = sum(p.untyped_storage().nbytes() for p in engine.model.parameters())
    static += sum(v.untyped_storage().nbytes() for st in engine.optimizer.optimizer.state.values()
                  for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    peak = static + _profiled_peak(lambda: engine.run([mb], forward_only=False))
    mem = P.stage_memory(cfg, V, P.Layout(1, 1, 1), 0)
    assert mem.terms["weights fp32 (ZeRO shard)"] + mem.terms["AdamW m, v fp32 (ZeRO shard)"] \
        == static
    assert mem.peak_backward == pytest.approx(peak, rel=0.20), (mem.peak_backward, peak)


def test_recompute_and_pipeline_change_the_estimate():
    cfg = load_config(REPO / "examples/configs/1.4b_vanilla.yaml")
    lay = P.make_layout(cfg, 8)
    off = P.stage_memory(cfg, 50304, lay, 0, recompute=False)
    on = P.stage_memory(cfg, 50304, lay, 0, recompute=True)
    assert on.activation.saved < off.activation.saved / 4
    piped = load_config(REPO / "examples/configs/1.4b_vanilla.yaml",
                        ["parallel.pipeline_model_parallel_size=2"])
    lay2 = P.make_layout(piped, 8)
    first, last = (P.stage_memory(piped, 50304, lay2, s) for s in (0, 1))
    assert (first.inflight_microbatches, last.inflight_microbatches) == (2, 1)  # 1F1B: PP - s
    assert first.params_local + last.params_local == P.total_params(piped, 50304)
    assert last.activation.head > first.activation.head  # the loss lives on the last stage
    gpipe = load_config(REPO / "examples/configs/1.4b_vanilla.yaml",
                        ["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_schedule=gpipe"])
    assert P.stage_memory(gpipe, 50304, lay2, 0).inflight_microbatches == 256 // (4 * 4)  # all


@pytest.mark.parametrize("config,world,overrides", [
    ("410m_adaptive", 8, ["parallel.pipeline_model_parallel_size=2"]),
    ("7b_adaptive", 64, ["parallel.pipeline_model_parallel_size=2"]),
    ("7b_adaptive", 64, ["parallel.tensor_model_parallel_size=8",
                         "parallel.pipeline_model_parallel_size=4"]),
], ids=["410m-pp2-dp4", "7b-tp4-pp2-dp8", "7b-tp8-pp4-dp2"])
def test_pipeline_layouts_fit_at_the_paper_batch(config, world, overrides, capsys):
    """Global batch 256: under 1F1B the latent loop holds K PP - s units on stage s (each at
    its step's bytes) and the K/V stores of at most 2 PP micro-batches, not all M: the same peak
    at 4x the batch; --check passes. GPipe's 410M PP2 plan needs ~430-470 GiB per GPU and
    fails the check."""
    path = str(REPO / f"examples/configs/{config}.yaml")
    assert P.main(["--config", path, "--world-size", str(world), "--check", *overrides]) == 0
    assert "pipeline schedule 1f1b" in capsys.readouterr().out
    cfg = load_config(path, overrides)
    lay, k = P.make_layout(cfg, world), cfg.latent.max_steps
    for recompute in (False, True):  # the per-step split that prices the units adds up
        act = P.activation_bytes(cfg, 50304, lay.tp, 0, cfg.train.micro_batch_size,
                                 recompute=recompute)
        assert len(act.per_step) == k
        assert sum(act.per_step) + act.kv_store == pytest.approx(act.layers)
    more = load_config(path, overrides + [f"train.global_batch_size={4 * cfg.train.global_batch_size}"])
    for s in range(lay.pp):
        mem = P.stage_memory(cfg, 50304, lay, s)
        # K PP - s live units (about PP - s/K micro-batches' worth), and the K/V store of each
        # micro-batch with a live unit: at most 2 PP of them under interleaved 1F1B
        assert mem.inflight_microbatches <= 2 * lay.pp, (s, mem.inflight_microbatches)
        assert P.stage_memory(more, 50304, lay, s).peak_backward == mem.peak_backward  # not M
    if config == "410m_adaptive":
        assert P.main(["--config", path, "--world-size", str(world), "--check", *overrides,
                       "parallel.pipeline_schedule=gpipe"]) == 3


def test_zero_shards_round_up_per_parameter():
    assert P.fsdp_shard_numel((10, 3), 4) == 3 * 3
    assert P.fsdp_shard_numel((8, 3), 4) == 2 * 3
    assert P.fsdp_shard_numel((5,), 1) == 5


# -- FLOPs and time ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_flops_per_token_match_the_scheduler(ctx, method):
    """The planner's exact FLOPs equal what the scheduler reports for a real forward."""
    from megatron_latentcot.model.latent import LatentStepScheduler
    from megatron_latentcot.model.llama import LlamaStage, init_weights

    rows = 2
    extra = {"mor": ["latent.max_steps=3", "model.num_layers=8"]}.get(method, [])
    cfg = _small([f"latent.method={method}", "latent.tau=0.0", *extra], rows)
    model = LlamaStage(cfg, ctx, V)
    init_weights(model, cfg.model, 0)
    scheduler = LatentStepScheduler(model, cfg)
    mb = _batch(cfg, rows)
    with torch.no_grad():
        out = scheduler.forward(mb)
    stats = scheduler.stats(out, mb)
    n = rows * cfg.data.seq_length
    assert P.train_flops_per_token(cfg, V, rows=rows) * n == pytest.approx(stats["flops"], rel=1e-9)
    if method == "vanilla":
        assert P.train_flops_per_token(cfg, V) == vanilla_train_flops(cfg.model, V, 1, 64) / 64


def test_adaptive_flops_follow_the_active_fractions():
    cfg = load_config(REPO / "examples/configs/410m_adaptive.yaml")
    full = P.train_flops_per_token(cfg, 50304)
    pruned = P.train_flops_per_token(cfg, 50304, [1.0, 0.8, 0.5, 0.2])
    one = P.train_flops_per_token(cfg, 50304, [1.0, 0.0, 0.0, 0.0])
    vanilla = P.train_flops_per_token(load_config(REPO / "examples/configs/410m_vanilla.yaml"), 50304)
    assert one == pytest.approx(vanilla, rel=1e-3)  # (router on z^(1) only)
    assert one < pruned < full
    assert P.passes_per_token(cfg, [1.0, 0.8, 0.5, 0.2]) == pytest.approx(2.5)


def test_time_per_iteration_by_hand():
    cfg = load_config(REPO / "examples/configs/1.4b_vanilla.yaml")
    plan = P.make_plan(cfg, P.make_layout(cfg, 8), 50304, gpu="H100", mfu=0.5)
    tokens = 256 * 2048
    assert plan.tokens_per_iter == tokens
    expected = plan.flops_per_token * tokens / (8 * 989e12 * 0.5)
    assert plan.time_per_iter_s == pytest.approx(expected)
    # the paper's convention for the vanilla 1.4B: 6 N per token, one pass
    assert plan.kaplan_flops_per_token == 6 * plan.total_params


# -- layouts and the command line ---------------------------------------------------------------

def test_layout_from_nodes_and_problems():
    cfg = load_config(REPO / "examples/configs/7b_adaptive.yaml")
    lay = P.make_layout(cfg, nodes=4, gpus_per_node=8)
    assert (lay.tp, lay.pp, lay.dp, lay.world, lay.nodes) == (4, 1, 8, 32, 4)
    piped = load_config(REPO / "examples/configs/7b_adaptive.yaml",
                        ["parallel.pipeline_model_parallel_size=2"])
    assert P.layout_problems(piped, P.make_layout(piped, 32)) == []  # the trainer runs it
    # a config that skipped validation: the planner reads config.py's table too
    paused = dataclasses.replace(piped, latent=dataclasses.replace(piped.latent, method="pause"))
    (problem,) = P.layout_problems(paused, P.make_layout(paused, 32))
    assert "latent.method=pause" in problem and "pipeline_model_parallel_size > 1" in problem
    with pytest.raises(Exception, match="not divisible"):
        P.make_layout(cfg, 30)


def test_cli_report_json_and_check(capsys):
    cfg = str(REPO / "examples/configs/1.4b_adaptive.yaml")
    assert P.main(["--config", cfg, "--gpu-memory-gb", "80"]) == 0
    text = capsys.readouterr().out
    assert "PEAK" in text and "FLOPs/token" in text and "OK: fits" in text
    assert P.main(["--config", cfg, "--json", "train.micro_batch_size=8"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert not data["fits"] and data["total_params"] == P.total_params(load_config(cfg), 50304)
    assert P.main(["--config", cfg, "--check", "train.micro_batch_size=8"]) == 3
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert P.main(["--config", cfg, "--world-size", "3", "parallel.tensor_model_parallel_size=2"]) == 2


# -- tensor parallel and ZeRO shards (two processes) --------------------------------------------

def _two_rank_shapes() -> dict:
    """TP = 2: each rank's parameter shapes; then DP = 2 with FSDP2: each rank's local numel of
    parameters and AdamW state after one step."""
    from megatron_latentcot.config import load_config as load
    from megatron_latentcot.parallel import destroy_distributed, init_distributed
    from megatron_latentcot.training.loop import Engine

    out = {}
    tp_cfg = load(None, SMALL + ["latent.method=adaptive", "parallel.tensor_model_parallel_size=2",
                                 "train.micro_batch_size=2", "train.global_batch_size=2"])
    ctx = init_distributed(tp_cfg.parallel)
    engine = Engine(tp_cfg, ctx, V)
    out["tp_shapes"] = {n: tuple(p.shape) for n, p in engine.model.named_parameters()}
    dp_cfg = load(None, SMALL + ["model.ffn_hidden_size=161", "model.hidden_size=68",
                                 "model.num_attention_heads=2", "model.num_query_groups=1",
                                 "train.micro_batch_size=2", "train.global_batch_size=8"])
    ctx = init_distributed(dp_cfg.parallel)
    engine = Engine(dp_cfg, ctx, V)
    mb = {"tokens": torch.zeros(2, 64, dtype=torch.long), "labels": torch.ones(2, 64, dtype=torch.long),
          "loss_mask": torch.ones(2, 64)}
    engine.train_step([mb] * 2)
    out["dp_params"] = sum(p.to_local().numel() for p in engine.model.parameters())
    out["dp_state"] = engine.optimizer.local_state_numel()
    destroy_distributed()
    return out


@pytest.mark.slow  # two spawned processes
def test_tensor_parallel_shapes_and_zero_shards():
    from tests.dist_utils import run_distributed

    results = run_distributed(_two_rank_shapes, 2)
    tp_cfg = _small(["latent.method=adaptive", "parallel.tensor_model_parallel_size=2"])
    for rank in results:
        assert rank["tp_shapes"] == P.stage_param_shapes(tp_cfg, V, 2, 0)
    dp_cfg = _small(["model.ffn_hidden_size=161", "model.hidden_size=68",
                     "model.num_attention_heads=2", "model.num_query_groups=1"])
    mem = P.stage_memory(dp_cfg, V, P.Layout(1, 1, 2), 0)
    # the planner reports the largest shard; FSDP2 gives rank 0 the rounded-up chunks
    assert results[0]["dp_params"] == mem.params_shard
    assert results[0]["dp_state"] == 2 * mem.params_shard
    assert results[0]["dp_params"] + results[1]["dp_params"] == P.total_params(dp_cfg, V)
    assert math.isclose(results[1]["dp_params"], mem.params_shard, rel_tol=0.05)


@pytest.mark.parametrize("tau", [0.0, 0.3], ids=["every-step", "pruned"])
def test_flex_masks_and_kv_store_equal_what_a_flex_forward_builds(ctx, tau, monkeypatch):
    """flex (its saved tensors cannot be measured on CPU: no backward there): the planner's
    block-mask bytes (one mask per pass) equal those of the masks and row layouts a real flex
    forward builds (exactly when every token runs every step, within 10% when survivors spread
    unevenly over rows: the planner assumes an even spread), and its K/V cache bytes exactly
    those of the per-layer stores the forward allocates."""
    from megatron_latentcot.model import attention as attn
    from megatron_latentcot.model.latent import KVStream, LatentStepScheduler
    from megatron_latentcot.model.llama import LlamaStage, init_weights

    rows, seq = 2, 300  # several block widths: 384 queries over 384 ... 1280 keys
    cfg = _small(["latent.method=adaptive", f"latent.tau={tau}", "latent.attention_backend=flex",
                  "data.reset_attention_mask=true", f"data.seq_length={seq}",
                  f"model.max_position_embeddings={seq}"], rows)
    model = LlamaStage(cfg, ctx, V)
    init_weights(model, cfg.model, 0)
    built, real = [], attn.flex_block_mask
    monkeypatch.setattr(attn, "flex_block_mask", lambda plan, block: built.append(
        real(plan, block)) or built[-1])
    mb = _batch(cfg, rows)
    mb["doc_ids"] = (torch.arange(seq) >= 121).long().repeat(rows, 1)
    model_stores = []
    real_caches = KVStream.layer_caches
    monkeypatch.setattr(KVStream, "layer_caches", lambda self, n: model_stores.extend(
        real_caches(self, n)) or self.kv)
    with torch.no_grad():
        out = LatentStepScheduler(model, cfg).forward(mb)
    masks = {id(m): (m, lay) for m, lay in built}.values()  # built once per pass
    assert len(masks) == len(out.records)
    held = sum(t.numel() * t.element_size() for m, lay in masks
               for t in (*m.as_tuple()[2:], *vars(lay).values()) if torch.is_tensor(t))
    stores = {id(store.k): store for store, _ in model_stores}
    kv_rows = sum(t.numel() * t.element_size() for st in stores.values() for t in (st.k, st.v))
    est = P.activation_bytes(cfg, V, 1, 0, rows, [r.tokens / (rows * seq) for r in out.records])
    rel = 0 if tau == 0 else 0.10
    assert est.attention_mask == pytest.approx(held, rel=rel)
    assert len(stores) == cfg.model.num_layers
    assert est.latent_cache == kv_rows  # the store is sized before the router decides
    if tau:
        assert len({r.tokens for r in out.records}) == len(out.records)  # pruned at every step


@pytest.mark.parametrize("scale", ["410m", "1.4b", "7b"])
def test_flex_mask_cost_at_paper_shapes(scale, capsys):
    """At the paper shapes (every token runs K_max = 4 steps, documents masked) the planner
    counts flex's block masks: MiB per micro-batch, a thousandth of the activations and over
    100x below the per-row dense masks SDPA would build; the report says so."""
    path = REPO / f"examples/configs/{scale}_adaptive.yaml"
    cfg = load_config(path, ["data.reset_attention_mask=true", "train.recompute=false"])
    sdpa = load_config(path, ["data.reset_attention_mask=true", "train.recompute=false",
                              "latent.attention_backend=sdpa"])
    flex = P.activation_bytes(cfg, 50304, 1, 0, cfg.train.micro_batch_size)
    dense = P.activation_bytes(sdpa, 50304, 1, 0, cfg.train.micro_batch_size)
    assert 0 < flex.attention_mask < 2**24 and flex.attention_mask < 1e-3 * flex.saved
    assert dense.attention_mask > 100 * flex.attention_mask
    assert P.main(["--config", str(path), "data.reset_attention_mask=true"]) == 0
    assert "flex masks" in capsys.readouterr().out
