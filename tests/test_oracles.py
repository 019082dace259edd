"""Oracles independent of the code under test.

- One to three training steps of the single-process ``Engine`` (``Optimizer``, ``lr_schedule``)
  against plain torch on a copy of the same model: ``torch.optim.AdamW`` with weight-decay groups
  chosen by hand from the parameter names, ``clip_grad_norm_`` with a clip that fires, and the
  learning rate written out by hand from the warmup + cosine formula.
- LAMBADA scoring (``eval/lambada.py``) of a real model whose weights make it a known bigram
  machine, on passages scored by hand (``fixtures/lambada_bigram.jsonl``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.inference_utils import reference_model

FIXTURES = Path(__file__).parent / "fixtures"


pytestmark = pytest.mark.usefixtures("one_thread")

# -- one Engine step == plain torch -----------------------------------------------------------

VOCAB, SEQ, MBS, GBS, CLIP = 64, 12, 2, 6, 0.05
LR, MIN_LR = 1e-2, 1e-3
TRAIN = ["model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=48", f"model.vocab_size={VOCAB}",
         f"data.seq_length={SEQ}", f"train.micro_batch_size={MBS}",
         f"train.global_batch_size={GBS}", f"train.lr={LR}", f"train.min_lr={MIN_LR}",
         "train.lr_warmup_iters=2", "train.train_iters=5", "train.lr_decay_style=cosine",
         "train.weight_decay=0.1", "train.adam_beta1=0.8", "train.adam_beta2=0.9",
         "train.adam_eps=1e-6", f"train.clip_grad={CLIP}", "train.precision=fp32"]
# Warmup over 2 updates, then cosine from LR to MIN_LR over the 3 remaining of train_iters = 5:
# update s (1-based) gets LR·s/2 for s <= 2, else MIN_LR + (LR - MIN_LR)·(1 + cos(π(s-2)/3))/2.
HAND_LRS = [LR / 2, LR, MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi / 3)) / 2]
METHODS = {"vanilla": ["latent.method=vanilla"],
           "adaptive": ["latent.method=adaptive", "latent.tau=0.3", "latent.max_steps=3",
                        "model.embedding_multiplier=null"]}


def _microbatches(step: int) -> list[dict[str, torch.Tensor]]:
    """One global batch of random tokens, some positions masked out of the loss."""
    g = torch.Generator().manual_seed(100 + step)
    data = torch.randint(0, VOCAB, (GBS, SEQ + 1), generator=g)
    mask = (torch.rand(GBS, SEQ, generator=g) > 0.2).float()
    return [{"tokens": d[:, :-1].contiguous(), "labels": d[:, 1:].contiguous(), "loss_mask": m}
            for d, m in zip(data.split(MBS), mask.split(MBS))]


def _plain_loss(model, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Vanilla LM loss by hand: the model's layers, then masked-mean cross-entropy."""
    from megatron_latentcot.model.attention import causal_plan

    rows, seq = mb["tokens"].shape
    h = model.embed(mb["tokens"].reshape(-1))
    h, _ = model.run_layers(h, torch.arange(seq).repeat(rows), causal_plan(rows, seq))
    logits = model.logits(model.final_norm(h)).reshape(rows * seq, -1)
    ce = F.cross_entropy(logits, mb["labels"].reshape(-1), reduction="none")
    mask = mb["loss_mask"].reshape(-1)
    return (ce * mask).sum() / mask.sum()


@pytest.mark.parametrize("method", list(METHODS))
def test_engine_steps_equal_plain_torch_adamw(method):
    """Three updates (two in warmup) of Engine.train_step == torch AdamW + clip_grad_norm_."""
    from megatron_latentcot.config import load_config
    from megatron_latentcot.inference.loading import world_of_one
    from megatron_latentcot.model.latent import LatentStepScheduler
    from megatron_latentcot.model.llama import LlamaStage
    from megatron_latentcot.training.loop import Engine

    cfg = load_config(None, TRAIN + METHODS[method])
    ctx = world_of_one()
    engine = Engine(cfg, ctx, VOCAB)
    ref = LlamaStage(cfg, ctx, VOCAB)
    ref.load_state_dict(engine.model.state_dict())
    if method == "vanilla":
        loss_of = _plain_loss
    else:  # the adaptive objective (with its router) is the model's own; the update is not
        scheduler = LatentStepScheduler(ref, cfg)
        loss_of = lambda model, mb: scheduler.forward(mb).loss  # noqa: E731

    # Exempt from weight decay by name: norm weights, the embedding, biases.
    params = dict(ref.named_parameters())
    exempt = {n for n in params if n.split(".")[-2].endswith("norm") or n.startswith("embed_tokens.")
              or n.endswith(".bias")}
    decayed = {n.split(".")[-2] for n in set(params) - exempt}
    assert decayed == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"} | (
        {"router"} if method == "adaptive" else set())
    assert (method == "adaptive") == ("router.bias" in exempt)
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in params.items() if n not in exempt], "weight_decay": 0.1},
         {"params": [p for n, p in params.items() if n in exempt], "weight_decay": 0.0}],
        lr=LR, betas=(0.8, 0.9), eps=1e-6)

    for step, lr in enumerate(HAND_LRS):
        mbs = _microbatches(step)
        out = engine.train_step(mbs)
        opt.zero_grad()
        loss = sum(loss_of(ref, mb) for mb in mbs) / len(mbs)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()

        assert out["lr"] == pytest.approx(lr, rel=1e-12, abs=0), step
        assert out["skipped"] == 0.0 and norm > 2 * CLIP  # the clip fired
        assert out["grad_norm"] == pytest.approx(norm, rel=1e-5), step
        objective = out["lm_loss"] + cfg.latent.adaptive_loss_weight * out.get("adaptive_loss", 0)
        assert objective == pytest.approx(loss.item(), rel=1e-6), step
        got = dict(engine.model.named_parameters())
        for name, p in params.items():
            torch.testing.assert_close(got[name], p, rtol=0, atol=1e-6,
                                       msg=lambda m, n=name, s=step: f"step {s}, {n}: {m}")


# -- LAMBADA on a bigram machine ----------------------------------------------------------------

ALPHABET = "\0 .\nabcdefghijklmnopqrstuvwxyz"  # id 0 is the EOD
SUCCESSOR = {" ": "c", "c": "a", "a": "t"}  # every other character is followed by a space
HIDDEN = 32  # = the vocabulary rows: one-hot embeddings


class CharTokenizer:
    """One id per character of ALPHABET (what evaluate_lambada uses: encode and eod)."""

    eod = 0

    def encode(self, text: str) -> list[int]:
        return [ALPHABET.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(ALPHABET[i] for i in ids)


def bigram_model():
    """A real (vanilla, 2-layer) model whose greedy next character is SUCCESSOR's.

    Embeddings are one-hot and every block's output projections are zero, so the residual stream
    at a position is the one-hot of its token; the final RMSNorm scales it to
    a = 1/sqrt(1/HIDDEN + eps) and the LM head maps token i to logit a on its successor only.
    """
    model = reference_model(["latent.method=vanilla", f"model.vocab_size={HIDDEN}",
                             f"model.hidden_size={HIDDEN}", "model.embedding_multiplier=1.0",
                             "model.max_position_embeddings=128"], HIDDEN, dtype=torch.float64)
    st = model.stage
    head = torch.zeros(HIDDEN, HIDDEN, dtype=torch.float64)
    for i, c in enumerate(ALPHABET):
        head[ALPHABET.index(SUCCESSOR.get(c, " ")), i] = 1.0
    with torch.no_grad():
        st.embed_tokens.weight.copy_(torch.eye(HIDDEN, dtype=torch.float64))
        for block in st.layers.values():
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        st.norm.weight.fill_(1.0)
        st.lm_head.weight.copy_(head)
    return model


def test_lambada_counts_hand_scored_passages_exactly():
    """6 of the 12 passages are right (each target character greedy); the log-likelihood is the
    hand formula: a hit costs log(e^a + V - 1) - a nats, a miss log(e^a + V - 1)."""
    from megatron_latentcot.eval.lambada import evaluate_lambada

    rows = [json.loads(line) for line in (FIXTURES / "lambada_bigram.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows]
    hits = [r["hits"] for r in rows]
    assert [len(h) for h in hits] == [len(t) - max(t.rfind(" "), t.rfind("\n")) for t in texts]
    model, tok = bigram_model(), CharTokenizer()
    a = 1 / math.sqrt(1 / HIDDEN + model.cfg.model.norm_eps)
    per_token = math.log(math.exp(a) + HIDDEN - 1)
    expected_ll = -sum(len(h) * per_token - sum(h) * a for h in hits)
    for batch_size in (1, 5, 16):  # right-padded rows score like rows alone
        r = evaluate_lambada(model, texts, tok, batch_size=batch_size)
        assert (r.examples, r.correct, r.target_tokens) == (12, 6, 47)
        assert r.loglikelihood_sum == pytest.approx(expected_ll, rel=1e-12)
    for text, h in zip(texts, hits):  # one at a time: each passage's verdict
        assert evaluate_lambada(model, [text], tok).correct == int(all(h)), text
