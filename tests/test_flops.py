"""The analytic FLOPs (``megatron_latentcot.flops`` via ``LatentStepScheduler.stats``) against
PyTorch's ``FlopCounterMode`` on the real forward + backward, and ``tools/compare_flops.py``.

What the counter sees on CPU (torch 2.13). It counts matmuls (``aten.mm``/``addmm``/``bmm``)
exactly. Attention goes through ``F.scaled_dot_product_attention``, which on CPU dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu`` (forward) and
``aten._scaled_dot_product_flash_attention_for_cpu_backward`` -- for ``is_causal=True`` and for a
boolean mask alike (the mask is first turned into an additive float mask by ``aten.where``), with
GQA handled inside the kernel (K/V keep their fewer heads). Neither op is in the counter's
``flop_registry`` (it only knows the CUDA flash/efficient/cuDNN ops), so **the stock counter
records 0 FLOPs for attention on CPU**, silently. We therefore register, via ``custom_mapping``,
torch's own dense SDPA formula for these two ops: forward = ``sdpa_flop_count`` =
``2·B·Hq·Lq·Lk·(D + Dv)`` (QK^T and PV as bmm over the full, **padded** [B, Hq, Lq, Lk] shape,
masked or not), backward = the four gradient bmms = 2 x forward (torch's registered CUDA-flash
backward formula adds a fifth bmm for recomputing QK^T, which the package's "training = 3 x
forward" convention does not count). This mapping equals what the counter records natively
(as ``aten.bmm``) when the math SDPA backend is forced: checked below.

So the counter's attention is dense over padded shapes: ``B·Lq·Lk`` pairs per head, while the
formula counts only visible (query, key) pairs. The non-attention part (layer matmuls, LM head,
router, p_target head, pondering's expected embeddings) must agree within 2% (it agrees
exactly); the attention part must be <= the counter's, and equal it times (L+1)/(2L) for plain
causal attention over L slots.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, bmm_flop, sdpa_flop_count

from tests.conftest import require

aten = torch.ops.aten
CPU_SDPA = aten._scaled_dot_product_flash_attention_for_cpu
CPU_SDPA_BWD = aten._scaled_dot_product_flash_attention_for_cpu_backward
VOCAB, SEQ, K = 96, 12, 4
BASE = ["model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=48", f"model.vocab_size={VOCAB}",
        "model.embedding_multiplier=null", f"latent.max_steps={K}", f"data.seq_length={SEQ}",
        "model.max_position_embeddings=64"]


def _sdpa_forward(query: torch.Size, key: torch.Size, value: torch.Size, *args, out_shape=None,
                  **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_backward(grad_out: torch.Size, query: torch.Size, key: torch.Size, value: torch.Size,
                   *args, out_shape=None, **kwargs) -> int:
    """dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: 2 x forward (no QK^T recompute)."""
    b, h, lq, d = query
    lk, dv = value[2], value[3]
    return 2 * bmm_flop((b * h, lq, dv), (b * h, dv, lk)) + 2 * bmm_flop((b * h, lq, lk), (b * h, lk, d))


CPU_ATTENTION = {CPU_SDPA: _sdpa_forward, CPU_SDPA_BWD: _sdpa_backward}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ctx():
    from megatron_latentcot.config import ParallelConfig
    from megatron_latentcot.parallel import init_distributed

    return init_distributed(ParallelConfig())


def build(ctx, overrides: list[str]):
    from megatron_latentcot.config import load_config
    from megatron_latentcot.model.latent import LatentStepScheduler
    from megatron_latentcot.model.llama import LlamaStage, init_weights

    cfg = load_config(None, BASE + overrides)
    model = LlamaStage(cfg, ctx, VOCAB)
    init_weights(model, cfg.model, seed=0)
    return cfg, model.float(), LatentStepScheduler(model, cfg)


def batch(rows: int = 3, seq: int = SEQ, docs: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (rows, seq + 1), generator=g)
    mb = {"tokens": data[:, :-1], "labels": data[:, 1:], "loss_mask": torch.ones(rows, seq)}
    if docs:
        mb["doc_ids"] = (torch.arange(seq) >= seq // 3).long().repeat(rows, 1)
    return mb


@dataclass
class Measured:
    formula: float  # the scheduler's reported ``flops`` stat
    formula_attention: float  # its attention terms (3 x 4·H·D·pairs per layer and step)
    counter: float  # FlopCounterMode total (with the CPU SDPA mapping)
    counter_attention: float
    out: Any  # LatentOutput

    @property
    def non_attention(self) -> tuple[float, float]:
        return self.formula - self.formula_attention, self.counter - self.counter_attention


def measure(ctx, overrides: list[str], docs: bool = False, mb: dict | None = None) -> Measured:
    from megatron_latentcot.flops import attention_flops

    cfg, _, sched = build(ctx, overrides)
    mb = mb or batch(docs=docs)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as fc:
        out = sched.forward(mb)
        out.loss.backward()
    counts = fc.get_flop_counts()["Global"]
    m = cfg.model
    return Measured(
        formula=sched.stats(out, mb)["flops"],
        formula_attention=3 * m.num_layers * sum(attention_flops(m, r.pairs) for r in out.records),
        counter=fc.get_total_flops(),
        counter_attention=counts.get(CPU_SDPA, 0) + counts.get(CPU_SDPA_BWD, 0), out=out)


# -- what the counter sees --------------------------------------------------------------------------

@pytest.mark.parametrize("masked", [False, True], ids=["is_causal", "bool-mask"])
def test_stock_counter_sees_no_cpu_sdpa_and_our_mapping_equals_the_math_path(masked):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket)
            return func(*args, **(kwargs or {}))

    b, h, hkv, t, d = 2, 4, 2, 10, 8
    q, k, v = (torch.randn(b, n, t, d, requires_grad=True) for n in (h, hkv, hkv))
    mask = torch.ones(t, t, dtype=torch.bool).tril().expand(b, 1, t, t) if masked else None

    def run() -> None:
        F = torch.nn.functional
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked,
                                       enable_gqa=True).sum().backward()

    with Ops() as ops:
        run()
    assert {CPU_SDPA, CPU_SDPA_BWD} <= ops.seen
    with FlopCounterMode(display=False) as stock:
        run()
    assert stock.get_total_flops() == 0  # nothing registered for the CPU kernels
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as ours:
        run()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as math_path:
        run()
    dense_forward = 4 * b * h * t * t * d  # padded/dense: every (query, key) pair, causal or not
    assert ours.get_total_flops() == math_path.get_total_flops() == 3 * dense_forward
    assert set(math_path.get_flop_counts()["Global"]) == {aten.bmm}


def test_mapping_matches_math_backend_on_a_latent_step(ctx):
    """Gathered, padded latent layout + doc mask: our CPU mapping == the math path's bmm count."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _, _, sched = build(ctx, ["latent.method=adaptive", "latent.tau=0.3"])
    mb = batch(docs=True)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as ours:
        sched.forward(mb).loss.backward()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as math_path:
        sched.forward(mb).loss.backward()
    assert ours.get_total_flops() == math_path.get_total_flops()


# -- formula vs counter, per method -----------------------------------------------------------------

CASES = {
    "vanilla": ["latent.method=vanilla"],
    "latent_fixed": ["latent.method=latent_fixed"],
    "adaptive": ["latent.method=adaptive", "latent.tau=0.3"],
    "adaptive-uncompacted": ["latent.method=adaptive", "latent.tau=0.3", "latent.compact=false"],
    "looped": ["latent.method=looped"],
    "pondering": ["latent.method=pondering"],
    "pause": ["latent.method=pause"],
    "ponderlm2": ["latent.method=ponderlm2", "latent.jacobi_iterations=1"],
}


def brute_force_pairs(steps: torch.Tensor, rows: int, seq: int, max_steps: int) -> list[int]:
    """Visible pairs per step from the 2-D rule alone: (t, k) sees (t', j) iff t' <= t, j <= k,
    same row, and (t', j) ran (last step of t' >= j)."""
    ran = torch.stack([steps.view(rows, seq) >= k for k in range(1, max_steps + 1)]).long()  # [K, B, T]
    visible = ran.cumsum(0).cumsum(2)  # keys with j <= k and t' <= t
    return [int((ran[k] * visible[k]).sum()) for k in range(int(steps.max()))]


DOC_MASKED = ("vanilla", "adaptive", "adaptive-uncompacted", "pause")


@pytest.mark.parametrize("case,docs", [(c, False) for c in CASES] + [(c, True) for c in DOC_MASKED],
                         ids=[*CASES, *(f"{c}-doc-masked" for c in DOC_MASKED)])
def test_formula_matches_counter(ctx, case, docs):
    r = measure(ctx, CASES[case], docs=docs)
    formula_rest, counter_rest = r.non_attention
    assert counter_rest > 0 and r.counter_attention > 0
    assert abs(formula_rest - counter_rest) <= 0.02 * counter_rest, (case, formula_rest, counter_rest)
    assert formula_rest == counter_rest  # in fact exact: every matmul is accounted for
    assert 0 < r.formula_attention <= r.counter_attention
    if case.startswith("adaptive"):
        steps = r.out.steps
        assert len(torch.unique(steps)) >= 3 and int(steps.max()) == K  # real pruning, reaches K
        continuations = int((steps - 1).sum())  # one p_target per (token, continued step)
        if case == "adaptive":
            assert r.out.ptarget_tokens == continuations
            if not docs:  # the scheduler's pair counts are the 2-D rule's
                assert [x.pairs for x in r.out.records] == brute_force_pairs(steps, 3, SEQ, K)
        else:  # uncompacted: halted slots are computed too, and counted
            assert r.out.ptarget_tokens >= continuations
    if not docs and not case.startswith(("adaptive", "ponderlm2")):  # ponderlm2: passes of
        # several lengths; its pairs are compared with flops.method_counts in test_ponderlm2.py
        # Plain causal: queries of a step see (L+1)/(2L) of the dense padded grid; for
        # latent_fixed step k's T queries see k(T+1)T/2 of k·T·T cached keys, the same fraction.
        length = SEQ * K if case == "pause" else SEQ
        ratio = r.formula_attention / r.counter_attention
        assert abs(ratio / ((length + 1) / (2 * length)) - 1) < 0.02, (case, ratio)


def test_vanilla_causal_attention_ratio_tracks_length(ctx):
    for seq in (8, 16):
        r = measure(ctx, ["latent.method=vanilla"], mb=batch(rows=2, seq=seq))
        assert math.isclose(r.formula_attention / r.counter_attention, (seq + 1) / (2 * seq),
                            rel_tol=1e-12)


def test_ptarget_head_is_counted_once_forward_only(ctx):
    """The per-step p_target head runs under no_grad: 2·d·V per continuing token, not 3x."""
    with_head = measure(ctx, CASES["adaptive"])
    without = measure(ctx, CASES["adaptive"] + ["latent.adaptive_loss_weight=0"])
    assert torch.equal(with_head.out.steps, without.out.steps)  # the loss weight does not route
    n_cont = with_head.out.ptarget_tokens
    assert n_cont > 0 and without.out.ptarget_tokens == 0
    assert with_head.counter - without.counter == 2 * 32 * VOCAB * n_cont
    assert with_head.formula - without.formula == 2 * 32 * VOCAB * n_cont


def test_router_counted_when_all_tokens_halt_before_k_max(ctx):
    """When every token halts before K_max the router also ran at that last executed step
    (k < K_max): ``stats`` counts it (it once dropped those 3 x 2·d FLOPs per token), so the
    formula equals the counter exactly, as for every other case."""
    r = measure(ctx, ["latent.method=adaptive", "latent.tau=0.45"])
    assert int(r.out.steps.max()) < K  # the loop ended early
    formula_rest, counter_rest = r.non_attention
    assert formula_rest == counter_rest, counter_rest - formula_rest


# -- doc-masked attention pairs against a brute-force loop --------------------------------------------

def loop_pairs(steps: torch.Tensor, doc_ids: torch.Tensor, dead_queries: bool) -> list[int]:
    """Visible pairs per executed step, one (query, key) pair at a time: query (row, t) at step
    k sees key (row', t', j) iff row' == row, t' <= t, j <= k, doc(t') == doc(t) and the key ran
    (steps[t'] >= j). Queries: slots that ran step k, or every slot when ``dead_queries``
    (uncompacted steps compute halted slots too). Independent of the binary-search count."""
    rows, seq = doc_ids.shape
    last, doc = steps.view(rows, seq).tolist(), doc_ids.tolist()
    slots = [(r, t) for r in range(rows) for t in range(seq)]
    counts = []
    for k in range(1, max(map(max, last)) + 1):
        n = 0
        for r, t in slots:
            if not dead_queries and last[r][t] < k:
                continue
            n += sum(1 for r2, t2 in slots for j in range(1, k + 1)
                     if r2 == r and t2 <= t and doc[r2][t2] == doc[r][t] and last[r2][t2] >= j)
        counts.append(n)
    return counts


def random_docs(rows: int, seq: int, g: torch.Generator) -> torch.Tensor:
    """Contiguous document ids per row (as the dataset makes them), 3 or more per row."""
    while True:
        doc = torch.cumsum(torch.rand(rows, seq, generator=g) < 0.3, dim=1)
        if int(doc[:, -1].min()) >= 2:
            return doc


@pytest.mark.parametrize("seed", [1, 2])
def test_doc_masked_pairs_of_random_plans_equal_the_loop(seed):
    """``visible_pairs`` on random latent plans (random halting, several documents per row),
    compacted (survivors only) and uncompacted (every slot, dead keys masked by ``k_live``)."""
    from megatron_latentcot.model.attention import causal_plan, latent_plan, visible_pairs

    rows, seq = 3, 11
    g = torch.Generator().manual_seed(seed)
    doc = random_docs(rows, seq, g)
    steps = torch.randint(1, K + 1, (rows * seq,), generator=g)
    steps[0] = K  # the loop reaches K_max
    alive = [steps >= k for k in range(1, K + 1)]  # [N] per step: the slot ran step k
    slots = torch.arange(rows * seq)
    for compact in (True, False):
        counts = [visible_pairs(causal_plan(rows, seq, doc))]
        for k in range(2, K + 1):
            if compact:
                q = slots[alive[k - 1]]
                keys, live = torch.cat([slots[alive[j]] for j in range(k)]), None
            else:
                q, keys = slots, slots.repeat(k)
                live = torch.cat(alive[:k])
            counts.append(visible_pairs(latent_plan(q, keys, live, rows, seq, doc)))
        assert counts == loop_pairs(steps, doc, dead_queries=not compact), compact


@pytest.mark.parametrize("case", ["vanilla", "adaptive", "adaptive-uncompacted"])
def test_scheduler_doc_masked_pairs_equal_the_loop(ctx, case):
    """The pairs the scheduler records (and feeds to the FLOPs formula) on a micro-batch with
    several documents per row equal the brute-force count of the 2-D rule."""
    _, _, sched = build(ctx, CASES[case])
    mb = batch(rows=3)
    mb["doc_ids"] = random_docs(3, SEQ, torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = sched.forward(mb)
    if case != "vanilla":
        assert len(torch.unique(out.steps)) >= 3  # real pruning: the step rule matters
    expected = loop_pairs(out.steps, mb["doc_ids"], dead_queries=case == "adaptive-uncompacted")
    assert [r.pairs for r in out.records] == expected
    assert expected[0] < 3 * SEQ * (SEQ + 1) // 2  # the documents cut pairs off


# -- tools/compare_flops.py: analytic mode ------------------------------------------------------------

def _tiny_yaml(tmp_path: Path) -> Path:
    from megatron_latentcot.config import load_config

    path = tmp_path / "tiny_flops.yaml"
    path.write_text(load_config(None, BASE).to_yaml())
    return path


def test_analytic_tiny_config_equals_scheduler(ctx, tmp_path):
    from megatron_latentcot.cli.compare_flops import main

    assert main(["--analytic", "--config", str(_tiny_yaml(tmp_path)), "--steps-dist", "0,0,0,1",
                 "--steps-dist", "1,0,0,0", "--steps-dist", "0.2,0.3,0.3,0.2", "--tokens", "1000",
                 "--out-dir", str(tmp_path)]) == 0
    rows = {r["label"]: r for r in json.loads((tmp_path / "flops_table.json").read_text())["rows"]}
    assert "| vanilla |" in (tmp_path / "flops_table.md").read_text()
    rows2 = 2
    mb = batch(rows=rows2)
    n = rows2 * SEQ
    # Baselines and the all-K adaptive row: exactly the scheduler's own per-token FLOPs.
    for label, overrides in [("vanilla", CASES["vanilla"]),
                             ("looped K=4", CASES["looped"]),
                             ("pondering K=4", CASES["pondering"]),
                             ("pause K=4", CASES["pause"]),
                             ("latent_fixed K=4", CASES["latent_fixed"]),
                             *((f"ponderlm2 K=2 J={j}", ["latent.method=ponderlm2",
                                                         "latent.max_steps=2",
                                                         f"latent.jacobi_iterations={j}"])
                               for j in (2, 3)),
                             ("adaptive K=4 [0,0,0,1]", ["latent.method=adaptive", "latent.tau=0"])]:
        _, _, sched = build(ctx, overrides)
        with torch.no_grad():
            stats = sched.stats(sched.forward(mb), mb)
        assert math.isclose(rows[label]["train_flops_per_token"], stats["flops"] / n, rel_tol=1e-12), label
        assert math.isclose(rows[label]["train_flops_total"], 1000 * stats["flops"] / n, rel_tol=1e-12)
    d = 32
    # Everyone exits after the token pass: vanilla + the router on every token (3 x 2·d).
    assert math.isclose(rows["adaptive K=4 [1,0,0,0]"]["train_flops_per_token"],
                        rows["vanilla"]["train_flops_per_token"] + 6 * d, rel_tol=1e-12)
    mid = rows["adaptive K=4 [0.2,0.3,0.3,0.2]"]
    assert mid["passes"] == pytest.approx(2.5)
    assert rows["vanilla"]["train_flops_per_token"] < mid["train_flops_per_token"] \
        < rows["latent_fixed K=4"]["train_flops_per_token"]
    for r in rows.values():  # the paper's convention next to it
        assert r["kaplan_flops_per_token"] == pytest.approx(6 * r["params"] * r["passes"])
    # Inference per generated token at position seq/2 = 6 with a K/V cache, by hand.
    layer = 2 * (d * (32 + 2 * 16) + 32 * d + 3 * d * 48)  # q, k, v (GQA), o, gate/up/down
    attn = 4 * 4 * 8  # per visible key: 4 heads x head dim 8, QK^T and PV
    head, c = 2 * d * VOCAB, SEQ // 2
    assert rows["vanilla"]["inference_flops_per_token"] == 2 * (layer + attn * (c + 1)) + head
    assert rows["latent_fixed K=4"]["inference_flops_per_token"] == pytest.approx(
        sum(2 * (layer + attn * (k + c * k)) for k in range(1, K + 1)) + head)
    assert rows["pause K=4"]["inference_flops_per_token"] == pytest.approx(
        K * 2 * layer + 2 * attn * sum(K * c + j for j in range(1, K + 1)) + head)
    # PonderLM-2 decodes its 2 stages like 2 pause slots, whatever J its training ran
    for j in (2, 3):
        assert rows[f"ponderlm2 K=2 J={j}"]["inference_flops_per_token"] == pytest.approx(
            2 * 2 * layer + 2 * attn * sum(2 * c + s for s in (1, 2)) + head)
        assert rows[f"ponderlm2 K=2 J={j}"]["passes"] == 3 + 2 * j


def test_expected_latent_pairs_match_random_halting():
    """The tool's expected per-step tokens and pairs vs exact counts on random halting."""
    from megatron_latentcot.flops import latent_counts

    dist, rows, seq = [0.2, 0.3, 0.3, 0.2], 400, 16
    g = torch.Generator().manual_seed(0)
    steps = torch.multinomial(torch.tensor(dist), rows * seq, replacement=True, generator=g) + 1
    expected = latent_counts(seq, dist, adaptive=True, ptarget=True)
    for k, pairs in enumerate(brute_force_pairs(steps, rows, seq, K)):
        assert pairs / rows == pytest.approx(expected.step_pairs[k], rel=0.03), k
        assert int((steps > k).sum()) / rows == pytest.approx(expected.step_tokens[k], rel=0.03), k
    # all tokens run every step: the 2-D rule gives k·T(T+1)/2 per row at step k
    full = brute_force_pairs(torch.full((rows * seq,), K), rows, seq, K)
    assert full == [rows * k * seq * (seq + 1) // 2 for k in range(1, K + 1)]
    assert latent_counts(seq, [0, 0, 0, 1], False, False).step_pairs == [k * seq * (seq + 1) / 2
                                                                         for k in range(1, K + 1)]


def test_presets_have_paper_sizes(tmp_path):
    from megatron_latentcot.cli.compare_flops import main

    assert main(["--analytic", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "flops_table.json").read_text())["rows"]
    params = {r["setup"]: r["params"] for r in rows if r["method"] == "vanilla"}
    assert 0.40e9 < params["410M"] < 0.415e9
    assert 1.40e9 < params["1.4B"] < 1.44e9
    assert 6.7e9 < params["7B"] < 7.0e9
    vanilla = {r["setup"]: r for r in rows if r["method"] == "vanilla"}
    # 6·N·D within a few % of the exact count at 1.4B (the paper's 2.18e20 uses N = 1.4e9)
    assert vanilla["1.4B"]["exact_over_kaplan"] == pytest.approx(1.0, abs=0.03)
    from megatron_latentcot.analysis.compare import PAPER_TOKENS

    # beside the paper: PonderLM-2 1.4B at the authors' mean J = 2.5 is their 8x, 17.47e20
    paper = {(r["setup"], r["paper"].split(" ")[0]): r
             for r in json.loads((tmp_path / "flops_table.json").read_text())["paper"]}
    plm2 = paper[("1.4B", "PonderLM-2")]
    assert plm2["passes"] == 8.0 and plm2["paper_train_flops"] == 17.47e20
    assert plm2["kaplan_flops_total"] == pytest.approx(8 * 6 * params["1.4B"] * PAPER_TOKENS)
    assert plm2["exact_over_paper"] == pytest.approx(1.0, abs=0.03)


# -- tools/compare_flops.py: run mode -----------------------------------------------------------------

def _write_run(root: Path, name: str, method: str, flops_per_iter: float, mean_steps: list[float],
               valid_ppl: list[float], latest: bool) -> Path:
    from megatron_latentcot.config import load_config

    run = root / name
    lines = []
    for i, it in enumerate((10, 20)):
        lines.append({"split": "train", "iteration": it, "lm_loss": 5.0 - i, "tokens": 2048.0,
                      "mean_steps": mean_steps[i], "flops": flops_per_iter,
                      "consumed_tokens": 20480 * (i + 1), "train_flops": flops_per_iter * it})
        lines.append({"split": "valid", "iteration": it, "loss": math.log(valid_ppl[i]),
                      "ppl": valid_ppl[i]})
    lines.append({"split": "heldout", "iteration": 20, "loss": math.log(300.0), "ppl": 300.0})
    if latest:  # a resumed run re-logs iteration 20: the later record wins
        lines.insert(3, {"split": "valid", "iteration": 20, "loss": 9.0, "ppl": 8103.0})
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = load_config(None, BASE + [f"latent.method={method}"]).to_dict()
    for it in (10, 20):
        (run / f"iter_{it:07d}").mkdir()
        manifest = {"config": cfg, "iteration": it, "train_flops": flops_per_iter * it}
        (run / f"iter_{it:07d}" / "manifest.json").write_text(json.dumps(manifest))
    if latest:
        (run / "latest").write_text("iter_0000020")
    return run


def test_run_mode_table_and_plots(tmp_path, capsys):
    from megatron_latentcot.cli.compare_flops import main

    a = _write_run(tmp_path, "van", "vanilla", 1e12, [1.0, 1.0], [400.0, 200.0], latest=True)
    b = _write_run(tmp_path, "ada", "adaptive", 2.5e12, [2.4, 2.6], [380.0, 150.0], latest=False)
    out = tmp_path / "out"
    assert main(["--runs", str(a), str(b), "--out-dir", str(out)]) == 0
    data = json.loads((out / "compare_runs.json").read_text())
    rows = {r["run"]: r for r in data["rows"]}
    # d 32, 2 layers, 4 heads (2 KV, head dim 8), FFN 48, vocab 96, untied:
    # embedding 96·32 + 2 x (32·64 + 32·32 + 3·32·48 + 2·32) + final norm 32 + head 96·32
    assert rows["van"]["params"] == 3072 + 2 * 7744 + 32 + 3072 == 21664
    assert rows["ada"]["params"] == 21664 + 33  # + router (w, b)
    assert rows["van"]["tokens"] == rows["ada"]["tokens"] == 40960
    assert rows["van"]["train_flops"] == 2e13 and rows["ada"]["train_flops"] == 5e13
    assert rows["ada"]["flops_ratio"] == pytest.approx(2.5) and rows["van"]["flops_ratio"] == 1.0
    assert rows["ada"]["flops_per_token"] == pytest.approx(5e13 / 40960)
    assert rows["van"]["valid_ppl"] == 200.0  # the duplicated iteration's later record
    assert rows["ada"]["valid_ppl"] == 150.0 and rows["ada"]["heldout_ppl"] == 300.0
    assert rows["ada"]["mean_steps"] == pytest.approx(2.5) and rows["van"]["mean_steps"] == 1.0
    assert data["curves"]["ada"]["valid_ppl"] == [[2.5e13, 380.0], [5e13, 150.0]]
    md = (out / "compare_runs.md").read_text()
    assert "| ada | adaptive | 4 | 21,697 | 40,960 | 5e+13 |" in md
    assert "FLOPs x van |" in md
    # the base does not follow --runs order; --reference picks another
    assert main(["--runs", str(b), str(a), "--out-dir", str(out), "--reference", "ada"]) == 0
    rows = {r["run"]: r for r in json.loads((out / "compare_runs.json").read_text())["rows"]}
    assert rows["van"]["flops_ratio"] == pytest.approx(0.4) and rows["ada"]["flops_ratio"] == 1.0
    assert "FLOPs x ada |" in (out / "compare_runs.md").read_text()
    assert main(["--runs", str(b), str(a), "--out-dir", str(out)]) == 0
    rows = {r["run"]: r for r in json.loads((out / "compare_runs.json").read_text())["rows"]}
    assert rows["van"]["flops_ratio"] == 1.0
    assert main(["--runs", str(a), "--out-dir", str(out), "--reference", "nope"]) == 1
    assert "--reference nope: expected one of the runs with training FLOPs: van" in \
        capsys.readouterr().err
    require("matplotlib")  # the tables above need no matplotlib; the plots do
    for png in ("ppl_vs_flops.png", "loss_vs_flops.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_mode_reports_missing_manifest(tmp_path, capsys):
    from megatron_latentcot.cli.compare_flops import main

    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"split": "train", "iteration": 1}\n')
    assert main(["--runs", str(run), "--out-dir", str(tmp_path / "out")]) == 1
    assert "no iter_*/manifest.json" in capsys.readouterr().err


# -- peak table -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 PCIe", 756.0),  # matched before the SXM part's "H100"
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("nvidia l40s", 362.0),  # any case
    ("cpu", None),
])
def test_peak_table_matches_the_device_name(name, peak):
    from megatron_latentcot.flops import peak_tflops

    assert peak_tflops(name, None) == peak
    assert peak_tflops(name, 123.0) == 123.0  # the override wins


def test_planner_uses_the_same_peak_table():
    from megatron_latentcot import plan
    from megatron_latentcot.config import load_config

    cfg = load_config(None, BASE)
    for gpu, peak in (("H100 PCIe", 756.0), ("H100", 989.0)):
        p = plan.make_plan(cfg, plan.make_layout(cfg), VOCAB, gpu=gpu, mfu=0.5)
        tokens = cfg.train.global_batch_size * SEQ
        assert p.time_per_iter_s == pytest.approx(p.flops_per_token * tokens / (peak * 1e12 * 0.5))


def test_analytic_mor_row_equals_scheduler_and_planner(ctx, tmp_path):
    """The compare tool's MoR row (expert-choice, N_r = 3, capacities (1, 2/3, 1/3)) on a
    5-layer model (one shared layer): training FLOPs == the scheduler's own count, parameters and
    passes == the planner's; its inference by hand."""
    from megatron_latentcot import plan as P
    from megatron_latentcot.cli.compare_flops import main
    from megatron_latentcot.config import load_config

    five = ["model.num_layers=5"]
    yaml = tmp_path / "tiny_mor_flops.yaml"
    yaml.write_text(load_config(None, BASE + five).to_yaml())
    assert main(["--analytic", "--config", str(yaml), "--steps-dist", "0,0,0,1", "--tokens",
                 "1000", "--out-dir", str(tmp_path)]) == 0
    rows = {r["label"]: r for r in json.loads((tmp_path / "flops_table.json").read_text())["rows"]}
    row = rows["mor expert N_r=3"]
    mor = ["latent.method=mor", "latent.max_steps=3", "mor.num_recursion=3"]
    cfg, _, sched = build(ctx, five + mor)
    mb = batch(rows=2)
    with torch.no_grad():
        stats = sched.stats(sched.forward(mb), mb)
    assert math.isclose(row["train_flops_per_token"], stats["flops"] / (2 * SEQ), rel_tol=1e-12)
    assert row["train_flops_per_token"] == P.flops_counts(cfg).train_flops(cfg.model, VOCAB) / SEQ
    assert row["params"] == P.total_params(cfg, VOCAB) < rows["vanilla"]["params"]  # 3 of 5 layers
    # layers run per token: 2 + 1 x (12 + 8 + 4) / 12 of the 3 physical ones
    assert row["passes"] == P.passes_per_token(cfg) == pytest.approx((2 + 24 / 12) / 3)
    d, c = 32, SEQ // 2
    layer = 2 * (d * (32 + 2 * 16) + 32 * d + 3 * d * 48)
    attn = 4 * 4 * 8
    a = [1, 8 / 12, 4 / 12]  # share of tokens in recursion r, its cache: 1 + c a_r keys
    want = (2 * (layer + attn * (c + 1)) + sum(ar * (layer + attn * (1 + c * ar)) for ar in a)
            + 2 * d * (1 + 1 + 8 / 12) + 2 * d * VOCAB)  # router r on its candidates; LM head
    assert row["inference_flops_per_token"] == pytest.approx(want, rel=1e-12)
    assert "mor expert N_r=3" not in json.dumps(  # too shallow (2 layers): no MoR row
        _analytic_rows_of(tmp_path / "two", _tiny_yaml(tmp_path)))


def _analytic_rows_of(out: Path, yaml: Path) -> list[dict[str, Any]]:
    from megatron_latentcot.cli.compare_flops import main

    assert main(["--analytic", "--config", str(yaml), "--steps-dist", "0,0,0,1", "--tokens", "1",
                 "--out-dir", str(out)]) == 0
    return json.loads((out / "flops_table.json").read_text())["rows"]


@pytest.mark.parametrize("name", ["410m_mor", "1.4b_mor", "7b_mor"])
def test_mor_presets_rows_equal_the_planner_of_their_configs(name):
    """The committed table's MoR rows are what plan.py counts for examples/configs/*_mor.yaml."""
    from megatron_latentcot import plan as P
    from megatron_latentcot.analysis.compare import PRESETS
    from megatron_latentcot.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "examples/configs" /
                          f"{name}.yaml"), [])
    setup = {"410m_mor": "410M", "1.4b_mor": "1.4B", "7b_mor": "7B"}[name]
    table = Path(__file__).resolve().parents[1] / "benchmarks/results/flops_table.json"
    row = next(r for r in json.loads(table.read_text())["rows"]
               if r["setup"] == setup and r["method"] == "mor")
    vocab = cfg.model.vocab_size
    assert PRESETS[setup]["seq"] == cfg.data.seq_length and row["K"] == cfg.mor.num_recursion
    assert row["params"] == P.total_params(cfg, vocab)
    assert row["train_flops_per_token"] == pytest.approx(
        P.flops_counts(cfg).train_flops(cfg.model, vocab) / cfg.data.seq_length, rel=1e-12)
    assert row["passes"] == pytest.approx(P.passes_per_token(cfg), rel=1e-12)


def test_mor_passes_and_inference_need_expert_capacities():
    """Token-choice depths are the router's: passes and decoding cost raise; expert-choice with
    capacity 1 everywhere is a middle-cycle looped model (every token through every layer)."""
    from megatron_latentcot import flops
    from megatron_latentcot.config import ModelConfig

    m = ModelConfig(hidden_size=32, num_layers=5, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=48)
    with pytest.raises(ValueError, match="token-choice"):
        flops.passes_per_token("mor", 3, seq=SEQ, base_depth=1)
    with pytest.raises(ValueError, match="token-choice"):
        flops.inference_flops_per_token(m, VOCAB, "mor", SEQ, 3, [0.2, 0.3, 0.5], base_depth=1)
    with pytest.raises(ValueError, match="base_depth"):
        flops.passes_per_token("mor", 3, capacity=[1, 1, 1])
    assert flops.passes_per_token("mor", 3, seq=SEQ, base_depth=1, capacity=[1, 1, 1]) == 5 / 3
    full = flops.inference_flops_per_token(m, VOCAB, "mor", SEQ, 3, base_depth=1,
                                           capacity=[1, 1, 1])
    looped5 = flops.inference_flops_per_token(m, VOCAB, "vanilla", SEQ, 1)
    assert full == looped5 + flops.router_flops(m, 3)  # 5 layers over a full cache + 3 routers
