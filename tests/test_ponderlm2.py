"""PonderLM-2 (``latent.method: ponderlm2``, docs/baselines_ponderlm2_mor.md 1), float64.

The training forward (growing initial passes, J Jacobi passes, a final pass over the interleaved
K-stage sequence) against the independent reference (tests/reference/naive.py); decoding (the
exact recurrence, token by token over the K/V cache) against the teacher-forced forward, which
equals it exactly where the Jacobi iteration has converged; FLOPs from what runs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests import test_latent_scheduler
from tests.test_latent_scheduler import (
    VOCAB,
    assert_grads_close,
    batch,
    build,
    ours_run,
    reference_run,
)

ctx = test_latent_scheduler.ctx  # the one-process parallel context fixture

TOL = dict(rtol=1e-9, atol=1e-11)


def method(stages: int, jacobi: int) -> list[str]:
    return ["latent.method=ponderlm2", f"latent.max_steps={stages}",
            f"latent.jacobi_iterations={jacobi}"]


@pytest.mark.parametrize("stages,jacobi,docs", [(2, 3, False), (3, 2, True)],
                         ids=["K2-J3-packed", "K3-J2-doc-masked"])
def test_training_forward_equals_definition(ctx, stages, jacobi, docs):
    cfg, model, sched = build(ctx, method(stages, jacobi))
    mb = batch(rows=2, seq=6, docs=docs)
    ref, ref_grads = reference_run(cfg, model, mb)
    out, grads = ours_run(model, sched, mb)
    torch.testing.assert_close(out.loss, ref["loss"], **TOL)
    torch.testing.assert_close(out.logits.view_as(ref["logits"]), ref["logits"], **TOL)
    assert_grads_close(grads, ref_grads)
    assert (out.steps == stages).all()


def test_exact_reference_is_the_converged_jacobi_forward():
    """The reference's exact recurrence == its Jacobi forward once J >= (K-1) T (the chain of
    dependencies is at most that long), and != at J = 1: the two references really differ."""
    from tests.reference import RefConfig, random_params
    from tests.reference.naive import ponderlm2, ponderlm2_exact

    cfg = RefConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    ffn_hidden_size=24, vocab_size=VOCAB, embedding_multiplier=2.0, max_steps=3,
                    jacobi_iterations=8)
    params = random_params(cfg, seed=3, std=0.3)
    mb = batch(rows=1, seq=4)
    args = (params, cfg, mb["tokens"], mb["labels"], mb["loss_mask"])
    exact = ponderlm2_exact(*args)["logits"]
    torch.testing.assert_close(ponderlm2(*args)["logits"], exact, rtol=1e-10, atol=1e-12)
    truncated = dataclasses.replace(cfg, jacobi_iterations=1)
    assert (ponderlm2(params, truncated, *args[2:])["logits"] - exact).abs().max() > 1e-6


def _decoder_model(stages: int, jacobi: int):
    from tests.test_generate import build as build_generate

    return build_generate("ponderlm2", extra=method(stages, jacobi))


@pytest.mark.parametrize("stages", [2, 3])
def test_decoding_equals_the_converged_training_forward(stages):
    """J = (K-1) T: every position of the teacher-forced forward is exact; the decoder (one token
    at a time, the whole prompt, or chunks) reproduces its logits."""
    from megatron_latentcot.inference.decoder import training_forward
    from tests.test_generate import decode_in_chunks, tokens

    seq = 8
    model = _decoder_model(stages, (stages - 1) * seq)
    toks = tokens(2, seq)
    tf = training_forward(model.scheduler, toks)
    for chunks in ([1] * seq, [seq], [3, 5]):
        logits, steps = decode_in_chunks(model, toks, chunks)
        assert (logits - tf.logits).abs().max().item() < 1e-10, chunks
        assert torch.equal(steps, tf.steps)


def test_truncated_jacobi_is_exact_up_to_position_j():
    """K = 2, J = 3 (the authors' evaluation J): positions t <= J are exact, later ones are not
    (docs/baselines_ponderlm2_mor.md 1.3), so the decoder agrees with the training forward on
    exactly those."""
    from megatron_latentcot.inference.decoder import training_forward
    from tests.test_generate import decode_in_chunks, tokens

    model = _decoder_model(2, 3)
    toks = tokens(2, 8)
    tf = training_forward(model.scheduler, toks)
    logits, _ = decode_in_chunks(model, toks, [8])
    diff = (logits - tf.logits).abs().amax(dim=(0, 2))
    assert (diff[:4] < 1e-10).all() and (diff[4:] > 1e-8).all(), diff


def test_flops_from_the_records_equal_the_analytic_counts(ctx):
    """Training: the scheduler's records == flops.method_counts (per row); 3 + 2J passes at
    K = 2. Decoding: the exact recurrence costs one pass over the interleaved sequence (pause's
    count), and one token at position T/2 flops.inference_flops_per_token."""
    from megatron_latentcot import flops
    from megatron_latentcot.inference.decoder import IncrementalDecoder
    from tests.test_generate import tokens

    rows, seq, stages, jacobi = 2, 6, 3, 2
    cfg, model, sched = build(ctx, method(stages, jacobi))
    with torch.no_grad():
        out = sched.forward(batch(rows=rows, seq=seq))
    got, want = sched.counts(out), flops.method_counts("ponderlm2", seq, stages, jacobi=jacobi)
    assert got.step_tokens == [rows * n for n in want.step_tokens]
    assert got.step_pairs == [rows * n for n in want.step_pairs]
    assert got.head_tokens == rows * want.head_tokens
    assert flops.passes_per_token("ponderlm2", stages, jacobi=jacobi) == sum(
        want.step_tokens) / seq == 1 + 2 + 3 * (jacobi + 1)
    assert flops.passes_per_token("ponderlm2", 2, jacobi=jacobi) == 3 + 2 * jacobi
    with pytest.raises(ValueError, match="jacobi"):
        flops.method_counts("ponderlm2", seq, stages)

    m = cfg.model
    dec = IncrementalDecoder(model, cfg, sched)
    dec.reset(1)
    toks = tokens(1, seq)[0]
    calls = [dec.extend([toks[t:t + 1]]) for t in range(seq)]
    pause = flops.method_counts("pause", seq, stages)
    assert sum(c.flops for c in calls) == flops.latent_forward_flops(
        m, VOCAB, pause.step_tokens, pause.step_pairs, pause.head_tokens)
    assert calls[seq // 2].flops == flops.inference_flops_per_token(m, VOCAB, "ponderlm2", seq,
                                                                    stages)


def test_tiny_config_and_layout_refusals():
    from megatron_latentcot.config import ConfigError, load_config

    cfg = load_config("examples/configs/tiny_ponderlm2.yaml")
    assert (cfg.latent.method, cfg.latent.max_steps, cfg.model.embedding_multiplier) == (
        "ponderlm2", 2, None)  # sqrt(2.5 d): the authors' embedding scale
    for overrides, field in ((["parallel.pipeline_model_parallel_size=2"], "pipeline"),
                             (["parallel.tensor_model_parallel_size=2",
                               "parallel.sequence_parallel=true"], "sequence_parallel"),
                             (["latent.jacobi_iterations=-1"], "jacobi_iterations")):
        with pytest.raises(ConfigError, match=field):
            load_config("examples/configs/tiny_ponderlm2.yaml", overrides)
