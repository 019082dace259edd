"""Perplexity (sliding window, per byte), LAMBADA-style accuracy and tools/evaluate.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import require
from tests.inference_utils import reference_model, save_world_of_one

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = Path(__file__).parent / "golden"
VOCAB = 96


def full_sequence_nll(model, seq: list[int]) -> torch.Tensor:
    """Per-token NLL of seq[1:] from one training forward over the whole sequence."""
    from megatron_latentcot.inference.decoder import training_forward

    tf = training_forward(model.scheduler, torch.tensor([seq[:-1]]))
    return torch.nn.functional.cross_entropy(tf.logits[0].double(), torch.tensor(seq[1:]),
                                             reduction="none")


def test_sliding_windows_score_each_token_once_with_bounded_context():
    from megatron_latentcot.eval.perplexity import sliding_windows

    seq = list(range(100, 131))  # 30 predictions
    for window, stride in ((8, 4), (8, 8), (8, 3), (40, 20), (1, 1)):
        ws = sliding_windows(seq, window, stride)
        scored = [t for w in ws for t in w.tokens[w.first:]]
        assert scored == seq[1:], (window, stride)
        for w in ws:
            assert len(w.tokens) - 1 <= window and w.first >= 1
        if window < 30:  # every window after the first has window - stride tokens of context
            assert all(w.first - 1 >= window - stride for w in ws[1:])
    assert len(sliding_windows(seq, 40, 20)) == 1


@pytest.mark.parametrize("method", ["adaptive", "pause"])
def test_perplexity_equals_direct_computation(method):
    from megatron_latentcot.eval.perplexity import Document, evaluate_perplexity

    model = reference_model([f"model.vocab_size={VOCAB}", f"latent.method={method}"], VOCAB,
                            dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    docs = [Document(torch.randint(1, VOCAB, (n,), generator=g).tolist(), "x" * n + " y z")
            for n in (5, 23, 14)]
    # one window covers each document: the same as one forward over [EOD] + doc
    whole = evaluate_perplexity(model, docs, eod=0, window=32, batch_size=2)
    direct = [full_sequence_nll(model, [0, *d.ids]) for d in docs]
    assert whole.tokens == 42 and whole.docs == 3
    assert whole.nll_sum == pytest.approx(sum(float(x.sum()) for x in direct), rel=1e-12)
    assert whole.token_perplexity == pytest.approx(math.exp(whole.nll_sum / 42))
    assert whole.bytes == 42 + 3 * 4 and whole.words == 3 * 3
    assert whole.bits_per_byte == pytest.approx(whole.nll_sum / math.log(2) / whole.bytes)
    # disjoint windows of 6: each chunk is scored with only its own window as context
    chunked = evaluate_perplexity(model, docs[1:2], eod=0, window=6, stride=6)
    seq = [0, *docs[1].ids]
    expect = sum(float(full_sequence_nll(model, seq[b:b + 7]).sum()) for b in range(0, 23, 6))
    assert chunked.nll_sum == pytest.approx(expect, rel=1e-12)
    assert chunked.nll_sum != pytest.approx(float(direct[1].sum()), rel=1e-6)
    # batching does not change the numbers
    one = evaluate_perplexity(model, docs, eod=0, window=8, stride=3, batch_size=1)
    many = evaluate_perplexity(model, docs, eod=0, window=8, stride=3, batch_size=16)
    assert one.nll_sum == pytest.approx(many.nll_sum, rel=1e-12)
    assert one.steps_sum == many.steps_sum
    if method == "pause":
        assert whole.mean_steps == 3.0


def test_greedy_flags_agree_with_decoding():
    """``Scored.greedy`` (teacher-forced argmax) == what the decoder emits greedily."""
    from megatron_latentcot.eval.scoring import Window, score_windows
    from megatron_latentcot.inference.decoder import IncrementalDecoder
    from megatron_latentcot.inference.generate import generate

    model = reference_model([f"model.vocab_size={VOCAB}", "latent.method=adaptive"], VOCAB,
                            dtype=torch.float64)
    with torch.no_grad():
        model.stage.router.weight.mul_(8.0)
    prompts = [[0, 5, 9, 11], [0, 40], [0, 7, 7, 7, 7, 7, 8]]
    gen = generate(IncrementalDecoder(model.stage, model.cfg), prompts, max_new_tokens=4)
    windows = [Window(p + g, first=len(p)) for p, g in zip(prompts, gen.tokens)]
    wrong = [Window(p + g[:-1] + [(g[-1] + 1) % VOCAB], first=len(p))
             for p, g in zip(prompts, gen.tokens)]
    right, bad = score_windows(model, windows), score_windows(model, wrong)
    assert all(s.greedy.all() for s in right)
    assert not any(s.greedy.all() for s in bad)
    for s, steps in zip(right, gen.steps):
        assert s.steps.tolist() == steps


def test_lambada_fixture_and_accuracy(sp_tokenizer):
    """The fixture splits as lm-eval does; batched scoring equals unbatched per-passage forwards
    (the hand-scored exact accuracy is tests/test_oracles.py)."""
    from megatron_latentcot.data.corpus import read_jsonl_texts
    from megatron_latentcot.eval.lambada import encode_pair, evaluate_lambada, split_last_word
    from megatron_latentcot.inference.decoder import training_forward

    texts = read_jsonl_texts(FIXTURES / "lambada_sotu.jsonl")
    assert len(texts) >= 20
    model = reference_model(["latent.method=adaptive"], 4096)
    correct, nll, n_target = 0, 0.0, 0
    for i, t in enumerate(texts):
        ctx, word = split_last_word(t)
        assert word.startswith(" ") and word.strip().isalpha() and ctx + word == t
        c_ids, w_ids = encode_pair(sp_tokenizer, ctx, word)
        assert c_ids + w_ids == sp_tokenizer.encode(t) and w_ids
        assert sp_tokenizer.decode(w_ids).strip() == word.strip()
        if i < 5:  # the passage alone, unbatched: its last len(w_ids) predictions score the word
            seq = torch.tensor([[sp_tokenizer.eod, *c_ids, *w_ids]])
            with torch.no_grad():
                logits = training_forward(model.scheduler, seq[:, :-1]).logits[0, -len(w_ids):]
            target = torch.tensor(w_ids)
            correct += int(bool((logits.argmax(-1) == target).all()))
            nll += float(torch.nn.functional.cross_entropy(logits.double(), target, reduction="sum"))
            n_target += len(w_ids)
    r = evaluate_lambada(model, texts[:5], sp_tokenizer, batch_size=2)  # padded batches
    assert (r.examples, r.correct, r.target_tokens) == (5, correct, n_target)
    assert r.loglikelihood_sum == pytest.approx(-nll, rel=1e-5)
    assert r.target_tokens >= r.examples and 1.0 <= r.to_dict()["mean_steps"] <= 3.0
    # an untrained model is about uniform over 4096 ids per target token
    per_token = -r.loglikelihood_sum / r.target_tokens
    assert abs(per_token - math.log(4096)) < 1.0


def test_indexed_dataset_documents(tmp_path):
    """Documents of a Megatron dataset (the golden one): EOD stripped, decoded text for bytes."""
    from megatron_latentcot.data.tokenizer import build_tokenizer
    from megatron_latentcot.eval.perplexity import documents_from_indexed, truncate_documents

    tok = build_tokenizer("sentencepiece", GOLDEN / "sotu_bpe1k.model")
    docs = documents_from_indexed(str(GOLDEN / "sotu_small_text_document"), tok)
    assert len(docs) == 20 and all(d.ids and d.ids[-1] != tok.eod for d in docs)
    assert sum(len(d.ids) for d in docs) == 9693 - 20  # every token but the appended EODs
    assert docs[0].text.startswith(tok.decode(docs[0].ids[:5]))
    cut = truncate_documents(docs, 1000, tok)
    assert sum(len(d.ids) for d in cut) == 1000


def test_evaluate_tool_writes_json_and_markdown(tmp_path, sp_tokenizer, sp_tokenizer_path):
    from megatron_latentcot.cli.evaluate import main

    save_world_of_one(tmp_path / "run", ["latent.method=adaptive",
                                         f"data.tokenizer_model={sp_tokenizer_path}"], 4096,
                      sp_tokenizer)
    out = tmp_path / "eval"
    assert main([str(tmp_path / "run"), "--jsonl", f"passages={FIXTURES / 'lambada_sotu.jsonl'}",
                 "--lambada", str(FIXTURES / "lambada_sotu.jsonl"), "--max-docs", "6",
                 "--window", "32", "--output-dir", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    ppl = res["perplexity"]["passages"]
    assert ppl["docs"] == 6 and ppl["tokens"] > 6 * 32  # longer than a window: several windows
    assert ppl["token_perplexity"] == pytest.approx(math.exp(ppl["nll_sum"] / ppl["tokens"]))
    assert 1.0 <= ppl["mean_steps"] <= 3.0
    assert res["lambada"]["lambada_sotu"]["examples"] == 6
    md = (out / "results.md").read_text()
    assert "| passages | 6 |" in md and "| lambada_sotu | 6 |" in md


def test_plot_latent_steps_tool(tmp_path, sp_tokenizer, sp_tokenizer_path):
    require("matplotlib")
    from megatron_latentcot.cli.plot_latent_steps import main
    from megatron_latentcot.data.corpus import read_jsonl_texts

    save_world_of_one(tmp_path / "run", ["latent.method=adaptive",
                                         f"data.tokenizer_model={sp_tokenizer_path}"], 4096,
                      sp_tokenizer)
    text = "\n".join(read_jsonl_texts(FIXTURES / "lambada_sotu.jsonl")[:2])
    out = tmp_path / "fig"
    assert main([str(tmp_path / "run"), "--text", text, "--max-tokens", "60",
                 "--output-dir", str(out)]) == 0
    data = json.loads((out / "latent_steps.json").read_text())
    assert data["tokens"] == 60 and sum(data["histogram"]) == 60
    assert "".join(data["pieces"]) == sp_tokenizer.decode(sp_tokenizer.encode(text)[:60])
    assert all(1 <= s <= 3 for s in data["steps"]) and len(data["loss"]) == 60
    page = (out / "latent_steps.html").read_text()
    assert page.count('<span class="t" style=') == 60 + 3  # tokens + legend
    for name in ("tokens", "hist", "vs_loss"):
        png = out / f"latent_steps_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_lm_eval_adapter_on_local_tasks(tmp_path, sp_tokenizer, sp_tokenizer_path, monkeypatch):
    """The four request types through lm-eval's own evaluator, on local task YAMLs."""
    lm_eval = require("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    from megatron_latentcot.data.corpus import read_jsonl_texts
    from megatron_latentcot.eval.lambada import evaluate_lambada
    from megatron_latentcot.eval.lm_eval import LatentCoTLM
    from megatron_latentcot.eval.perplexity import documents_from_texts, evaluate_perplexity

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for y in (FIXTURES / "lm_eval").glob("*.yaml"):
        (tasks / y.name).write_text(y.read_text().replace("__FIXTURES__", str(FIXTURES))
                                    .replace("__CACHE__", str(tmp_path / "hf_cache")))
    model = reference_model(["latent.method=adaptive", "model.max_position_embeddings=512"], 4096)
    model.tokenizer = sp_tokenizer
    lm = LatentCoTLM(model=model, batch_size=4, max_length=512, max_gen_toks=6)
    names = ["mlc_lambada_sotu", "mlc_mc_sotu", "mlc_rolling_sotu", "mlc_generate_sotu"]
    out = lm_eval.simple_evaluate(model=lm, tasks=names, limit=5, bootstrap_iters=0,
                                  log_samples=False, task_manager=TaskManager(
                                      include_path=str(tasks), include_defaults=False))
    res = out["results"]
    assert set(names) <= set(res)
    texts = read_jsonl_texts(FIXTURES / "lambada_sotu.jsonl")[:5]
    ours = evaluate_lambada(model, texts, sp_tokenizer)
    assert res["mlc_lambada_sotu"]["acc,none"] == pytest.approx(ours.accuracy)
    assert res["mlc_lambada_sotu"]["perplexity,none"] == pytest.approx(ours.perplexity, rel=1e-6)
    assert 0.0 <= res["mlc_mc_sotu"]["acc,none"] <= 1.0
    ppl = evaluate_perplexity(model, documents_from_texts(texts, sp_tokenizer), sp_tokenizer.eod,
                              window=512)  # each passage fits one window, as in lm-eval here
    assert res["mlc_rolling_sotu"]["word_perplexity,none"] == pytest.approx(ppl.word_perplexity,
                                                                            rel=1e-6)
    assert res["mlc_rolling_sotu"]["bits_per_byte,none"] == pytest.approx(ppl.bits_per_byte,
                                                                          rel=1e-6)
    assert 0.0 <= res["mlc_generate_sotu"]["exact_match,strip"] <= 1.0
    assert lm.latent_steps and set(lm.latent_steps) <= {1, 2, 3}
