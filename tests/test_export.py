"""Checkpoints of any layout load into one process; exports load back (HF Llama, latent format)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.inference_utils import TINY, reference_model, save_world_of_one

VOCAB = 96


def assert_same_weights(a, b) -> None:
    from megatron_latentcot.model.export import logical_state_dict

    sa, sb = logical_state_dict(a.stage), logical_state_dict(b.stage)
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_world_of_one_checkpoint_loads_with_tokenizer(tmp_path, sp_tokenizer, sp_tokenizer_path,
                                                     hf_tokenizer_path):
    from megatron_latentcot.inference.decoder import training_forward
    from megatron_latentcot.inference.loading import LoadError, load_model

    overrides = ["latent.method=adaptive", f"data.tokenizer_model={sp_tokenizer_path}"]
    path = save_world_of_one(tmp_path / "run", overrides, 4096, sp_tokenizer)
    assert path.name == "iter_0000005"
    loaded = load_model(tmp_path / "run")  # follows 'latest'
    ref = reference_model(overrides, 4096)
    assert_same_weights(loaded, ref)
    assert loaded.tokenizer is not None and loaded.tokenizer.fingerprint == sp_tokenizer.fingerprint
    assert loaded.source["iteration"] == 5 and loaded.method == "adaptive"
    toks = torch.tensor([sp_tokenizer.encode("The state of the Union is strong.")])
    a, b = training_forward(loaded.scheduler, toks), training_forward(ref.scheduler, toks)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.steps, b.steps)
    with pytest.raises(LoadError, match="fingerprint"):
        load_model(path, tokenizer_model=hf_tokenizer_path)
    (path / "rank_00000.pt").write_bytes(b"damaged")
    with pytest.raises(LoadError, match="checksum"):
        load_model(path)


def _save_parallel(out: str, overrides: list[str]) -> bool:
    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed, init_distributed
    from megatron_latentcot.training import checkpoint as ckpt
    from megatron_latentcot.training.loop import Engine

    cfg = load_config(None, TINY + overrides)
    ctx = init_distributed(cfg.parallel)
    engine = Engine(cfg, ctx, VOCAB)  # seeded init_weights: the same full model on any layout
    payload = {"model": engine.model.state_dict(),
               "optimizer": engine.optimizer.optimizer.state_dict()}
    ckpt.save_checkpoint(out, 1, payload, {"config": cfg.to_dict()}, ctx, 1)
    destroy_distributed()
    return True


def _check_parallel(tmp_path: Path, world: int, overrides: list[str]) -> None:
    from megatron_latentcot.inference.decoder import training_forward
    from megatron_latentcot.inference.loading import load_model

    run_distributed(_save_parallel, world, str(tmp_path), overrides)
    loaded = load_model(tmp_path)
    single = [o for o in overrides if not o.startswith("parallel.")]
    ref = reference_model(single + ["train.seed=1234"], VOCAB, seed=1234)
    assert_same_weights(loaded, ref)
    toks = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    a, b = training_forward(loaded.scheduler, toks), training_forward(ref.scheduler, toks)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.steps, b.steps)


@pytest.mark.slow
def test_tensor_parallel_checkpoint_is_stitched(tmp_path):
    """TP = 2: fused QKV / gate-up parts, column, row and vocab-parallel slices."""
    _check_parallel(tmp_path, 2, [f"model.vocab_size={VOCAB}", "latent.method=adaptive",
                                  "parallel.tensor_model_parallel_size=2"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["parallel.tensor_model_parallel_size=2", "parallel.zero=fsdp2", "latent.method=adaptive"],
    ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"],
], ids=["tp2-dp2-fsdp2", "tp2-pp2"])
def test_four_rank_checkpoints_are_gathered(tmp_path, layout):
    _check_parallel(tmp_path, 4, [f"model.vocab_size={VOCAB}", *layout])


@pytest.mark.parametrize("multiplier,tie", [("null", False), ("1.0", True)],
                         ids=["scaled-untied", "tied"])
def test_vanilla_export_loads_in_transformers_with_equal_logits(tmp_path, multiplier, tie):
    from tests.conftest import require
    transformers = require("transformers")
    from megatron_latentcot.cli.export_hf import main as export_main
    from megatron_latentcot.inference.decoder import training_forward

    overrides = [f"model.vocab_size={VOCAB}", f"model.embedding_multiplier={multiplier}",
                 f"model.tie_embeddings={str(tie).lower()}", "model.init_std=0.05"]
    save_world_of_one(tmp_path / "run", overrides, VOCAB)
    assert export_main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ours = reference_model(overrides, VOCAB)
    toks = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(toks).logits
    err = (training_forward(ours.scheduler, toks).logits - ref).abs().max().item()
    assert err < 2e-5, err


def test_latent_export_round_trip(tmp_path, sp_tokenizer, sp_tokenizer_path):
    from megatron_latentcot.cli.export_hf import main as export_main
    from megatron_latentcot.inference.decoder import training_forward
    from megatron_latentcot.inference.loading import load_model

    overrides = ["latent.method=adaptive", f"data.tokenizer_model={sp_tokenizer_path}"]
    save_world_of_one(tmp_path / "run", overrides, 4096, sp_tokenizer)
    with pytest.raises(ValueError, match="not a plain Llama"):
        export_main([str(tmp_path / "run"), str(tmp_path / "hf"), "--format", "hf"])
    assert export_main([str(tmp_path / "run"), str(tmp_path / "out")]) == 0  # auto -> latent
    meta = json.loads((tmp_path / "out" / "latent_config.json").read_text())
    assert meta["latent"]["method"] == "adaptive" and meta["tokenizer"]["file"] == "tokenizer.model"
    loaded = load_model(tmp_path / "out")
    assert loaded.tokenizer is not None and loaded.tokenizer.fingerprint == sp_tokenizer.fingerprint
    ref = reference_model(overrides, 4096)
    assert_same_weights(loaded, ref)
    toks = torch.tensor([sp_tokenizer.encode("Fellow citizens of the Senate")])
    a, b = training_forward(loaded.scheduler, toks), training_forward(ref.scheduler, toks)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.steps, b.steps)
