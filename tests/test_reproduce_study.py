"""The reproduction study's non-training logic (tools/reproduce_study.py, eval/study.py).

Per-step readouts on real models of every method (seeded random weights: the readout code must
agree with the training forward), the Figure-2 gain curves and the steps-vs-difficulty
correlation on known inputs, the recorded study arrays against the recorded analysis, and the
driver's plan, resume and compute-matching logic.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from megatron_latentcot.eval.study import (
    Readouts,
    gain_curve,
    rankdata,
    spearman,
    step_gain_curves,
    steps_histogram,
    steps_vs_difficulty,
    stream_rows,
)

REPO = Path(__file__).resolve().parents[1]
RECORDED = REPO / "benchmarks" / "results" / "reproduce_small"


# -- analysis on known inputs ------------------------------------------------------------------

def test_stream_rows_cuts_the_document_stream_like_training_samples():
    x, y = stream_rows([[5, 6, 7], [8, 9], [10]], eod=2, rows=2, seq=3)
    # stream: 2 5 6 7 2 8 9 (2 10 unused)
    assert x.tolist() == [[2, 5, 6], [7, 2, 8]]
    assert y.tolist() == [[5, 6, 7], [2, 8, 9]]
    with pytest.raises(ValueError, match="needed"):
        stream_rows([[5, 6]], eod=2, rows=2, seq=3)


def test_gain_curve_bins_means_and_missing_steps():
    p0 = np.array([0.01, 0.03, 0.04, 0.55, 0.95, 1.0, np.nan, 0.5])
    p1 = np.array([0.03, 0.02, 0.08, 0.50, 0.90, 0.97, 0.30, np.nan])
    c = gain_curve(p0, p1, bins=(0.0, 0.02, 0.05, 0.5, 1.0))
    assert c["total"] == 6  # the two pairs with a NaN are left out
    assert c["count"] == [1, 2, 0, 3]  # 1.0 falls in the last bin (upper edge included)
    assert c["mean_gain"][0] == pytest.approx(0.02)
    assert c["mean_gain"][1] == pytest.approx((-0.01 + 0.04) / 2)
    assert c["mean_gain"][2] is None and c["sem"][2] is None
    assert c["mean_gain"][3] == pytest.approx((-0.05 - 0.05 - 0.03) / 3)
    assert c["frac_down"] == [0.0, 0.5, None, 1.0]
    assert c["overall_gain"] == pytest.approx((0.02 - 0.01 + 0.04 - 0.05 - 0.05 - 0.03) / 6)


def test_gain_curve_binned_by_an_independent_value():
    p0, p1 = np.array([0.1, 0.2, 0.9, 0.8]), np.array([0.3, 0.1, 0.95, np.nan])
    c = gain_curve(p0, p1, bins=(0.0, 0.5, 1.0), by=np.array([0.9, 0.1, 0.2, 0.3]))
    assert c["count"] == [2, 1] and c["total"] == 3  # bins follow ``by``, not p0
    assert c["mean_gain"] == pytest.approx([(-0.1 + 0.05) / 2, 0.2])
    assert c["mean_p"] == pytest.approx([0.15, 0.9])
    with pytest.raises(ValueError, match="one size"):
        gain_curve(p0, p1, by=np.zeros(3))
    g = step_gain_curves(np.stack([p0, p0 + 0.1, p0 + 0.3], -1), bins=(0.0, 0.5, 1.0),
                         by=np.array([0.9, 0.1, 0.2, 0.3]))
    assert g["pooled"]["count"] == [6, 2]
    assert g["pooled"]["mean_gain"] == pytest.approx([0.15, 0.15])


def test_step_gain_curves_pool_transitions_that_ran():
    p = np.array([[0.1, 0.2, 0.4], [0.5, np.nan, np.nan], [0.8, 0.7, 0.75]])
    g = step_gain_curves(p, bins=(0.0, 0.5, 1.0))
    assert set(g["transitions"]) == {"1->2", "2->3"}
    assert g["transitions"]["1->2"]["total"] == 2 and g["transitions"]["2->3"]["total"] == 2
    assert g["transitions"]["1->2"]["mean_gain"] == pytest.approx([0.1, -0.1])
    assert g["transitions"]["2->3"]["mean_gain"] == pytest.approx([0.2, 0.05])
    assert g["pooled"]["total"] == 4
    assert g["pooled"]["mean_gain"] == pytest.approx([(0.1 + 0.2) / 2, (-0.1 + 0.05) / 2])
    assert g["mean_p_by_step"][1] == pytest.approx(0.45)


def _naive_average_ranks(x):
    return np.array([sum(v < a for v in x) + (sum(v == a for v in x) + 1) / 2 for a in x])


def test_rank_correlation_with_ties_against_a_naive_definition():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 5, 300)  # heavy ties, like step counts
    y = np.round(x + rng.normal(0, 2, 300), 1)  # some ties too
    assert rankdata([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    np.testing.assert_allclose(rankdata(y), _naive_average_ranks(y))
    expected = np.corrcoef(_naive_average_ranks(x), _naive_average_ranks(y))[0, 1]
    assert spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert spearman(x, -y) == pytest.approx(-expected, abs=1e-12)
    assert math.isnan(spearman(np.ones(10), np.arange(10)))


def test_steps_vs_difficulty_finds_hard_tokens_given_more_steps():
    rng = np.random.default_rng(1)
    loss = rng.gamma(2.0, 2.0, (40, 64))
    steps = np.digitize(loss, np.quantile(loss, [0.25, 0.5, 0.75])) + 1  # harder -> more steps
    noisy = np.where(rng.random(loss.shape) < 0.3, rng.integers(1, 5, loss.shape), steps)
    r = steps_vs_difficulty(noisy, loss, 4, n_boot=50)
    assert 0.4 < r["spearman"] < 0.95
    lo, hi = r["spearman_ci95"]
    assert lo < r["spearman"] < hi and hi - lo < 0.2
    means = [b["mean_ref_nll"] for b in r["by_steps"]]
    assert means == sorted(means)  # more steps, harder tokens
    assert sum(b["frac"] for b in r["by_steps"]) == pytest.approx(1.0)
    assert steps_histogram(noisy, 4) == pytest.approx([b["frac"] for b in r["by_steps"]])
    flat = steps_vs_difficulty(np.full(loss.shape, 4), loss, 4, n_boot=20)
    assert math.isnan(flat["spearman"]) and flat["spearman_ci95"] is None
    with pytest.raises(ValueError, match="same"):
        steps_vs_difficulty(steps[:, :10], loss, 4)


# -- readouts on real models -------------------------------------------------------------------

@pytest.mark.parametrize("method", ["vanilla", "adaptive", "latent_fixed", "looped", "pondering",
                                    "pause", "ponderlm2"])
def test_step_readouts_agree_with_the_training_forward(method):
    """The last readout is the model's prediction (z^f for adaptive is a mix: only the executed
    steps are checked there); NaN exactly where a token did not run a step."""
    import torch

    from megatron_latentcot.eval.study import step_readouts
    from megatron_latentcot.inference.decoder import training_forward
    from tests.inference_utils import reference_model

    vocab = 64
    extra = ["latent.router_bias_init=0.4"] if method == "adaptive" else []
    model = reference_model([f"latent.method={method}", *extra], vocab, dtype=torch.float64)
    rng = np.random.default_rng(3)
    x = rng.integers(0, vocab, (5, 16))
    y = np.concatenate([x[:, 1:], rng.integers(0, vocab, (5, 1))], axis=1)
    ro = step_readouts(model, x, y, batch_rows=2)  # batches of rows: 2 + 2 + 1
    tf = training_forward(model.scheduler, torch.as_tensor(x), torch.as_tensor(y))
    ref = -torch.log_softmax(tf.logits, -1).gather(-1, torch.as_tensor(y)[..., None])[..., 0]
    np.testing.assert_allclose(ro.nll, ref.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(ro.steps, tf.steps.numpy())
    k = 1 if method == "vanilla" else 3
    assert ro.p_target.shape == (5, 16, k)
    ran = np.arange(k)[None, None, :] < ro.steps[..., None]
    np.testing.assert_array_equal(np.isfinite(ro.p_target), ran)
    if method == "adaptive":
        assert 1 < ro.steps.mean() < 3  # some tokens halt early, some run every step
    else:
        np.testing.assert_allclose(ro.p_target[..., -1], np.exp(-ro.nll), rtol=1e-9)
    round_trip = Readouts.from_npz(ro.to_npz())
    np.testing.assert_array_equal(round_trip.steps, ro.steps)
    np.testing.assert_allclose(round_trip.p_target, ro.p_target, rtol=2e-3, equal_nan=True)


def test_mor_readouts_are_its_prediction_at_its_depth():
    """MoR's one readout (the prediction) sits at the depth its router chose; the study's
    4 layers with N_r = 2 route exactly floor(T / 2) tokens of each row through recursion 2."""
    import torch

    from megatron_latentcot.analysis.study import final_readouts
    from megatron_latentcot.inference.decoder import training_forward
    from tests.inference_utils import reference_model

    vocab = 64
    model = reference_model(["model.num_layers=4", "latent.method=mor", "latent.max_steps=2",
                             "mor.num_recursion=2"], vocab, dtype=torch.float64)
    rng = np.random.default_rng(3)
    x = rng.integers(0, vocab, (5, 16))
    y = np.concatenate([x[:, 1:], rng.integers(0, vocab, (5, 1))], axis=1)
    ro = final_readouts(model, x, y, batch_rows=2)
    tf = training_forward(model.scheduler, torch.as_tensor(x), torch.as_tensor(y))
    ref = -torch.log_softmax(tf.logits, -1).gather(-1, torch.as_tensor(y)[..., None])[..., 0]
    np.testing.assert_allclose(ro.nll, ref.numpy(), rtol=1e-9, atol=1e-9)
    assert ((ro.steps == 2).sum(axis=1) == 8).all() and ro.steps.min() == 1
    assert ro.p_target.shape == (5, 16, 2)
    at_depth = np.arange(2)[None, None, :] == ro.steps[..., None] - 1
    np.testing.assert_array_equal(np.isfinite(ro.p_target), at_depth)
    np.testing.assert_allclose(ro.p_target[at_depth], np.exp(-ro.nll).ravel(), rtol=1e-12)


# -- the recorded study ------------------------------------------------------------------------

def _recorded() -> dict:
    path = RECORDED / "study.json"
    if not path.is_file():
        pytest.skip(f"{path} not recorded yet (bash examples/reproduce_small.sh)")
    return json.loads(path.read_text())


def test_recorded_arrays_reproduce_the_recorded_analysis():
    """study.json's correlation and gain curves follow from the committed token arrays, and its
    table from the committed per-run JSONs."""
    from megatron_latentcot.analysis.study import analyze, load_results, load_tokens

    study = _recorded()
    results = load_results(RECORDED)
    assert {r["run"] for r in study["rows"]} == set(results)
    for row in study["rows"]:
        r = results[row["run"]]
        assert row["valid_ppl"] == pytest.approx(r["eval"]["valid"]["token_perplexity"])
        assert row["train_flops"] == r["train"]["flops"]
    ada, van = load_tokens(RECORDED, "adaptive_s1"), load_tokens(RECORDED, "vanilla_s1")
    np.testing.assert_array_equal(ada.labels, van.labels)  # the same tokens for every model
    rho = steps_vs_difficulty(ada.steps, van.nll, 4)["spearman"]
    assert rho == pytest.approx(study["correlation"]["adaptive_s1"]["vs_vanilla_s1"]["spearman"])
    looped = load_tokens(RECORDED, "looped_k4")
    pooled = step_gain_curves(looped.p_target)["pooled"]
    assert pooled["count"] == study["gain"]["looped_k4"]["pooled"]["count"]
    again = analyze(results, RECORDED)
    assert again["correlation"]["adaptive_s1"]["vs_vanilla_s1"]["spearman_ci95"] == \
        pytest.approx(study["correlation"]["adaptive_s1"]["vs_vanilla_s1"]["spearman_ci95"])


# -- the driver --------------------------------------------------------------------------------

def test_plan_same_tokens_and_seed_policy():
    from megatron_latentcot.analysis.study import SEEDS, study_plan

    plan = study_plan(160, "d", "r", deep_layers=12)
    by = {s.name: s for s in plan}
    assert len(by) == len(plan) == 15
    shared = ("train.train_iters", "data.seq_length", "train.global_batch_size",
              "data.data_path", "model.hidden_size")
    for s in plan:
        for key in shared:
            assert s.overrides[key] == by["vanilla_s1"].overrides[key], (s.name, key)
        assert s.overrides["train.save"] == s.overrides["train.load"] == f"r/{s.name}"
    for group in ("vanilla", "adaptive"):  # the two key methods: two seeds
        assert sorted(s.seed for s in plan if s.group == group) == sorted(SEEDS)
    assert {s.seed for s in plan if s.group not in ("vanilla", "adaptive")} == {SEEDS[0]}
    diff = {k for k in by["vanilla_deep"].overrides
            if by["vanilla_deep"].overrides[k] != by["vanilla_s1"].overrides.get(k)}
    assert diff == {"model.num_layers", "train.save", "train.load"}
    assert by["vanilla_deep"].overrides["model.num_layers"] == 12
    assert by["looped_k2"].overrides["latent.max_steps"] == 2
    assert (by["ponderlm2"].overrides["latent.max_steps"],
            by["ponderlm2"].overrides["latent.jacobi_iterations"]) == (2, 3)  # the authors' K, J
    # MoR on the study's 4 layers: N_r = 2 (a shared block of 1), expert-choice, default capacities
    assert (by["mor"].overrides["latent.max_steps"], by["mor"].overrides["mor.num_recursion"],
            by["mor"].overrides["mor.router"]) == (2, 2, "expert")
    assert "mor.capacity" not in by["mor"].overrides
    assert by["vanilla_emb"].overrides["model.embedding_multiplier"] is None
    assert by["vanilla_emb"].args()[-1] == "model.embedding_multiplier=null"
    assert by["pause_emb1"].args()[-1] == "model.embedding_multiplier=1.0"
    assert "vanilla_deep" not in {s.name for s in study_plan(160, "d", "r")}


def test_matched_layers_picks_the_closest_depth():
    from megatron_latentcot.analysis.study import matched_layers, vanilla_flops_per_token

    f = [vanilla_flops_per_token(n, 2048) for n in range(4, 20)]
    assert f == sorted(f) and f[1] - f[0] == pytest.approx(f[2] - f[1])  # linear in depth
    assert matched_layers(vanilla_flops_per_token(11, 2048), 2048) == 11
    just_above = vanilla_flops_per_token(11, 2048) + 0.4 * (f[1] - f[0])
    assert matched_layers(just_above, 2048) == 11
    assert matched_layers(vanilla_flops_per_token(11, 2048) + 0.6 * (f[1] - f[0]), 2048) == 12


def test_finished_runs_are_skipped_and_other_plans_refused(tmp_path):
    from megatron_latentcot.analysis.study import StudyError, finished, result_path, study_plan

    spec = study_plan(160, "d", "r")[0]
    assert not finished(tmp_path, spec)
    path = result_path(tmp_path, spec.name)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"name": spec.name, "config": spec.config,
                                "overrides": spec.overrides}))
    assert finished(tmp_path, spec)
    other = study_plan(80, "d", "r")[0]  # another budget
    with pytest.raises(StudyError, match="train.train_iters"):
        finished(tmp_path, other)


def test_compare_curves_leave_a_complete_comparison_alone(tmp_path, capsys):
    """With some results' run directories absent (``--only`` on another machine) the committed
    comparison is not overwritten by one of fewer runs."""
    from megatron_latentcot.analysis.study import compare_curves

    (tmp_path / "runs" / "vanilla_s1").mkdir(parents=True)
    (tmp_path / "runs" / "vanilla_s1" / "metrics.jsonl").write_text("")
    compare_curves({"vanilla_s1": {}, "ponderlm2": {}}, tmp_path / "runs", tmp_path / "out")
    err = capsys.readouterr().err
    assert "no run directory" in err and "ponderlm2" in err and "vanilla_s1" not in err.split(
        "for ")[-1]
    assert not (tmp_path / "out" / "compare").exists()
