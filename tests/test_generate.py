"""Incremental decoding equals the training forward, for every method (float64).

The training forward (the method's step generator on one stage, returning its final logits)
is teacher-forced over whole sequences; the decoder drives the same generator over the same
tokens one at a time (or in chunks, or rows of different lengths at once) with its per-step
K/V cache. Logits, halting decisions and forward FLOPs must agree.
"""

from __future__ import annotations

import pytest
import torch

from megatron_latentcot.config import METHODS
from tests.inference_utils import decoded_flops_equal_forward

VOCAB = 96
TOL = 1e-10
BASE = ["model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=48", f"model.vocab_size={VOCAB}",
        "model.embedding_multiplier=null", "latent.max_steps=4", "data.seq_length=12",
        "model.max_position_embeddings=64", "latent.tau=0.3"]


# PonderLM-2 decodes its exact recurrence; the training forward equals it once the Jacobi
# iteration has converged: J >= (K-1) T (K = 4, T <= 12 here; tests/test_ponderlm2.py)
CONVERGED = {"ponderlm2": ["latent.jacobi_iterations=36"],
             # MoR (N_r = 3, a 1-layer shared block): expert-choice decodes by its causal
             # threshold rule, which the training forward then uses too (tests/test_mor.py)
             "mor": ["latent.max_steps=3", "model.num_layers=5", "mor.expert_selection=threshold"]}


def build(method: str, dtype=torch.float64, extra=(), seed: int = 0):
    from megatron_latentcot.config import load_config
    from megatron_latentcot.inference.loading import build_model
    from megatron_latentcot.model.llama import init_weights

    cfg = load_config(None, BASE + [f"latent.method={method}", *CONVERGED.get(method, []),
                                    *extra])
    model = build_model(cfg, VOCAB, dtype=torch.float32)
    init_weights(model.stage, cfg.model, seed=seed)
    if method == "adaptive":  # spread the gates so that tokens halt after 1, 2, 3 or 4 steps
        with torch.no_grad():
            model.stage.router.weight.mul_(8.0)
    model.stage.to(dtype)
    return model


def tokens(rows=3, seq=12, seed=0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


def decode_in_chunks(model, toks: torch.Tensor, chunks: list[int]):
    """Feed every row the same chunk sizes; returns [B, T, V] logits and [B, T] steps."""
    from megatron_latentcot.inference.decoder import IncrementalDecoder

    dec = IncrementalDecoder(model.stage, model.cfg)
    dec.reset(toks.shape[0])
    logits, steps, start = [], [], 0
    for size in chunks:
        out = dec.extend([row[start:start + size] for row in toks])
        logits.append(out.logits.view(toks.shape[0], size, -1))
        steps.append(out.steps.view(toks.shape[0], size))
        start += size
    assert start == toks.shape[1]
    return torch.cat(logits, 1), torch.cat(steps, 1)


MAX_DIFF: dict[str, float] = {}


@pytest.mark.parametrize("method", METHODS)
def test_step_by_step_decoding_equals_training_forward(method):
    from megatron_latentcot.inference.decoder import training_forward

    model = build(method)
    toks = tokens()
    tf = training_forward(model.scheduler, toks)
    # the observed logits are the training loss's logits
    ce = torch.nn.functional.cross_entropy(tf.logits[:, :-1].reshape(-1, VOCAB),
                                           toks[:, 1:].reshape(-1), reduction="none")
    assert torch.isfinite(ce).all()
    for chunks in ([1] * 12, [12], [5, 1, 1, 3, 2]):
        logits, steps = decode_in_chunks(model, toks, chunks)
        diff = (logits - tf.logits).abs().max().item()
        MAX_DIFF[method] = max(MAX_DIFF.get(method, 0.0), diff)
        assert diff < TOL, (method, chunks, diff)
        assert torch.equal(steps, tf.steps), (method, chunks)
    if method == "adaptive":
        assert len(torch.unique(tf.steps)) >= 3  # real halting: several step counts
    elif method == "vanilla":
        assert (tf.steps == 1).all()
    elif method == "mor":  # recursions per token (routed; tests/test_mor.py checks they vary)
        assert ((tf.steps >= 0) & (tf.steps <= 3)).all()
    else:
        assert (tf.steps == 4).all()


def test_uncompacted_decoding_hides_the_dead_rows_keys():
    """latent.compact=false: halted tokens' rows keep running but are dead; their K/V, cached
    across calls, stay invisible (the streams' live tags) as in the training forward."""
    from megatron_latentcot.inference.decoder import training_forward

    model = build("adaptive", extra=["latent.compact=false"])
    toks = tokens()
    tf = training_forward(model.scheduler, toks)
    assert len(torch.unique(tf.steps)) >= 3
    for chunks in ([1] * 12, [5, 1, 1, 3, 2]):
        logits, steps = decode_in_chunks(model, toks, chunks)
        assert (logits - tf.logits).abs().max().item() < TOL, chunks
        assert torch.equal(steps, tf.steps), chunks


@pytest.mark.parametrize("method", ["adaptive", "pause", "pondering", "ponderlm2"])
def test_rows_of_different_lengths_in_one_batch(method):
    """Rows fed different numbers of tokens per call == each row's own training forward."""
    from megatron_latentcot.inference.decoder import IncrementalDecoder, training_forward

    model = build(method)
    lengths = [12, 5, 9]
    rows = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    dec = IncrementalDecoder(model.stage, model.cfg)
    dec.reset(3)
    got = [[] for _ in rows]
    got_steps = [[] for _ in rows]
    done = [0, 0, 0]
    schedule = [[3, 1, 0], [1, 4, 2], [4, 0, 1], [0, 0, 6], [4, 0, 0]]
    for sizes in schedule:
        out = dec.extend([r[d:d + s] for r, d, s in zip(rows, done, sizes)])
        at = 0
        for i, s in enumerate(sizes):
            got[i].append(out.logits[at:at + s])
            got_steps[i].append(out.steps[at:at + s])
            at += s
            done[i] += s
    assert done == lengths
    for i, row in enumerate(rows):
        tf = training_forward(model.scheduler, row[None])
        diff = (torch.cat(got[i]) - tf.logits[0]).abs().max().item()
        assert diff < TOL, (method, i, diff)
        assert torch.equal(torch.cat(got_steps[i]), tf.steps[0])


def test_generation_batch_equals_single_prompts_and_padding():
    from megatron_latentcot.inference.decoder import IncrementalDecoder
    from megatron_latentcot.inference.generate import generate, generate_padded

    model = build("adaptive")
    dec = IncrementalDecoder(model.stage, model.cfg)
    prompts = [tokens(1, n, seed=20 + n)[0].tolist() for n in (7, 2, 11)]
    batch = generate(dec, prompts, max_new_tokens=6)
    assert [len(t) for t in batch.tokens] == [6, 6, 6] and batch.finish_reasons == ["length"] * 3
    for i, p in enumerate(prompts):
        alone = generate(dec, [p], max_new_tokens=6)
        assert alone.tokens[0] == batch.tokens[i]
        assert alone.steps[0] == batch.steps[i]
    width = max(map(len, prompts))
    for side in ("left", "right"):
        ids = torch.zeros(3, width, dtype=torch.long)
        mask = torch.zeros(3, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
            ids[i, sl], mask[i, sl] = torch.tensor(p), 1
        padded = generate_padded(dec, ids, mask, max_new_tokens=6)
        assert padded.tokens == batch.tokens
    # greedy continuation == argmax of the training forward on prompt + continuation
    from megatron_latentcot.inference.decoder import training_forward

    full = torch.tensor(prompts[0] + batch.tokens[0][:-1])[None]
    tf = training_forward(model.scheduler, full)
    assert tf.logits[0, len(prompts[0]) - 1:].argmax(-1).tolist() == batch.tokens[0]
    assert tf.steps[0, len(prompts[0]) - 1:].tolist() == batch.steps[0]
    stats = batch.stats()
    assert 1.0 <= stats["mean_latent_steps"] <= 4.0
    assert stats["mean_latent_steps"] == pytest.approx(
        sum(map(sum, batch.steps)) / 18)
    assert stats["flops_per_token"] > 0 and stats["tokens_per_s"] > 0


def test_eod_stop_and_sampling():
    from megatron_latentcot.inference.decoder import IncrementalDecoder
    from megatron_latentcot.inference.generate import SamplingConfig, generate, sample_next

    model = build("adaptive", dtype=torch.float32)
    dec = IncrementalDecoder(model.stage, model.cfg)
    prompts = [[5, 6, 7], [8]]
    greedy = generate(dec, prompts, max_new_tokens=5)
    eod = greedy.tokens[0][2]  # make the third greedy token of row 0 the end of document
    stopped = generate(dec, prompts, max_new_tokens=5, eod=eod)
    assert stopped.tokens[0] == greedy.tokens[0][:2] and stopped.finish_reasons[0] == "eod"
    by_fn = generate(dec, prompts, max_new_tokens=5, stop=lambda row, gen: len(gen) == 3)
    assert [len(t) for t in by_fn.tokens] == [3, 3] and by_fn.finish_reasons == ["stop"] * 2
    s = SamplingConfig(temperature=1.0, top_p=0.9, seed=3)
    a, b = generate(dec, prompts, 8, s), generate(dec, prompts, 8, s)
    assert a.tokens == b.tokens  # seeded
    limited = generate(dec, prompts, 8, SamplingConfig(temperature=1.0, seed=1), vocab_limit=10)
    assert all(t < 10 for row in limited.tokens for t in row)
    # top-p keeps the smallest nucleus; a tiny p is greedy
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(0))
    nucleus = sample_next(logits, SamplingConfig(temperature=1.0, top_p=1e-6),
                          torch.Generator().manual_seed(0))
    assert torch.equal(nucleus, logits.argmax(-1))
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, -1)
    draws = sample_next(probs, SamplingConfig(temperature=1.0, top_p=0.7),
                        torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; 2 and 3 are cut
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    top2 = sample_next(probs, SamplingConfig(temperature=1.0, top_k=2),
                       torch.Generator().manual_seed(0))
    assert set(top2.tolist()) == {0, 1}


def test_decoder_flops_match_the_training_count():
    """Prefill FLOPs of a plain causal batch == ``flops.forward_flops`` of the same tokens."""
    from megatron_latentcot.flops import causal_pairs, forward_flops
    from megatron_latentcot.inference.decoder import IncrementalDecoder

    model = build("vanilla", dtype=torch.float32)
    dec = IncrementalDecoder(model.stage, model.cfg)
    dec.reset(2)
    out = dec.extend([list(range(1, 11)), list(range(1, 11))])
    assert out.flops == forward_flops(model.cfg.model, VOCAB, 20, causal_pairs(2, 10), 20)
    # one more token: 11 visible keys per row
    step = dec.extend([[3], [4]])
    assert step.flops == forward_flops(model.cfg.model, VOCAB, 2, 22, 2)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("ponderlm2", "mor")])
def test_decoder_flops_equal_the_training_forward_flops(method):
    """Prefill, and the one-token calls summed, cost the training forward's forward FLOPs of the
    same tokens (every query sees the same keys); and the count is the method's own. (Not
    ponderlm2: its decoder runs the exact recurrence, not the Jacobi passes; its decoder FLOPs
    are tested in tests/test_ponderlm2.py; mor's, data-dependent, in tests/test_mor.py.)"""
    from megatron_latentcot.flops import latent_forward_flops, method_counts

    model = build(method, dtype=torch.float32)
    expected = decoded_flops_equal_forward(model, tokens(2, 8))
    # the analytic count of the method's passes and heads (two rows of 8: twice one row's)
    m, k = model.cfg.model, model.scheduler.max_steps

    def analytic(name: str) -> float:
        c = method_counts(name, 8, k, dist=[1.0] + [0.0] * (k - 1))
        return 2 * latent_forward_flops(m, VOCAB, c.step_tokens, c.step_pairs, c.head_tokens)

    if method == "adaptive":  # halting saves more than the router costs
        assert analytic("vanilla") < expected < analytic("latent_fixed")
    else:
        assert expected == analytic(method)


def test_max_diff_report():
    """Runs last: every method was compared (the numbers are in the -rA summary)."""
    if len(MAX_DIFF) == len(METHODS):
        print({k: f"{v:.2e}" for k, v in MAX_DIFF.items()})
        assert max(MAX_DIFF.values()) < TOL


def test_generate_tool_on_a_checkpoint(tmp_path, sp_tokenizer, sp_tokenizer_path):
    import json

    from megatron_latentcot.cli.generate import main
    from megatron_latentcot.inference.generate import generate_text
    from megatron_latentcot.inference.loading import load_model
    from tests.inference_utils import save_world_of_one

    save_world_of_one(tmp_path / "run", ["latent.method=adaptive",
                                         f"data.tokenizer_model={sp_tokenizer_path}"], 4096,
                      sp_tokenizer)
    prompts = ["Fellow citizens of the Senate", "The economy"]
    assert main([str(tmp_path / "run"), "--prompt", prompts[0], "--prompt", prompts[1],
                 "--max-new-tokens", "8", "--json", str(tmp_path / "out.json")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    s = out["summary"]
    assert s["generated_tokens"] == sum(len(g["steps"]) for g in out["generations"]) > 0
    assert 1.0 <= s["mean_latent_steps"] <= 3.0 and s["flops_per_token"] > 0
    texts, _ = generate_text(load_model(tmp_path / "run"), prompts, 8)
    assert [g["output"] for g in out["generations"]] == texts
