"""Oracle: with TP = PP = 1 our Llama's logits equal HF transformers' LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import require
from tests.dist_utils import run_distributed

transformers = require("transformers")


def _compare(tie: bool, doc_masking: bool) -> float:
    from megatron_latentcot.config import load_config
    from megatron_latentcot.model.attention import causal_plan
    from megatron_latentcot.model.export import hf_llama_config, logical_state_dict, to_hf_llama
    from megatron_latentcot.model.llama import LlamaStage, init_weights
    from megatron_latentcot.parallel import destroy_distributed, init_distributed

    vocab = 256
    cfg = load_config(None, [
        "model.hidden_size=64", "model.num_layers=3", "model.num_attention_heads=8",
        "model.num_query_groups=2", "model.ffn_hidden_size=160", f"model.vocab_size={vocab}",
        "model.rope_theta=500000", f"model.tie_embeddings={str(tie).lower()}",
        "model.init_std=0.05"])
    ctx = init_distributed(cfg.parallel)
    model = LlamaStage(cfg, ctx, vocab)
    init_weights(model, cfg.model, seed=3)
    hf = transformers.LlamaForCausalLM(hf_llama_config(cfg.model, vocab)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_llama(logical_state_dict(model), vocab),
                                             strict=False)
    allowed = {"lm_head.weight"} if tie else set()  # HF ties it to the embedding itself
    assert not unexpected and set(missing) <= allowed, (missing, unexpected)
    rows, seq = 2, 24
    tokens = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if doc_masking:  # two documents per row: HF sees each one separately
            doc_ids = (torch.arange(seq) >= 10).long().repeat(rows, 1)
            ref = torch.cat([hf(tokens[:, :10]).logits, hf(tokens[:, 10:]).logits], dim=1)
            positions = torch.cat([torch.arange(10), torch.arange(seq - 10)]).repeat(rows)
            plan = causal_plan(rows, seq, doc_ids)
        else:
            ref = hf(tokens).logits
            positions = torch.arange(seq).repeat(rows)
            plan = causal_plan(rows, seq)
        h, _ = model.run_layers(model.embed(tokens.reshape(-1)), positions, plan)
        ours = model.logits(model.final_norm(h)).view(rows, seq, vocab)
    err = (ours - ref).abs().max().item()
    destroy_distributed()
    return err


@pytest.mark.parametrize("tie", [False, True])
def test_logits_equal_hf_llama(tie):
    err = run_distributed(_compare, 1, tie, False)[0]
    assert err < 2e-5, err


def test_document_masking_equals_separate_documents():
    err = run_distributed(_compare, 1, False, True)[0]
    assert err < 2e-5, err
