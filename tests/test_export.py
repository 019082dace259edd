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


# -- a run trained with a GPT-2 vocab/merges pair (Megatron-LM's --vocab-file/--merge-file) ----

@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, corpus_paths, gpt2_tokenizer_path) -> dict[str, Path]:
    """A 3-iteration vanilla run on real text whose tokenizer is a vocab.json + merges.txt pair
    (HF's names for GPT-2's encoder.json + vocab.bpe), preprocessed with --vocab/--merge-file."""
    import shutil

    from megatron_latentcot.cli.preprocess_data import main as preprocess
    from megatron_latentcot.config import load_config
    from megatron_latentcot.training.loop import Trainer

    out = tmp_path_factory.mktemp("gpt2_run")
    pair = out / "gpt2"
    pair.mkdir()
    shutil.copy(gpt2_tokenizer_path.parent / "encoder.json", pair / "vocab.json")
    shutil.copy(gpt2_tokenizer_path.parent / "vocab.bpe", pair / "merges.txt")
    lines = Path(corpus_paths.train).read_text().splitlines()
    (out / "train.jsonl").write_text("\n".join(lines[:6]) + "\n")
    assert preprocess(["--input", str(out / "train.jsonl"), "--output-prefix", str(out / "train"),
                       "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                       str(pair / "vocab.json"), "--merge-file", str(pair / "merges.txt"),
                       "--append-eod", "--workers", "1"]) == 0
    prefix = str(out / "train_text_document")
    cfg = load_config(None, TINY + [
        "data.tokenizer_type=GPT2BPETokenizer", f"data.tokenizer_model={pair}",
        f"data.data_path=[{prefix}]", f"data.valid_path={prefix}", "train.micro_batch_size=2",
        "train.global_batch_size=2", "train.train_iters=3", "train.eval_interval=0",
        "train.eval_iters=1", "train.log_interval=1", "train.lr=1e-3", "parallel.zero=none",
        "model.init_std=0.05", f"train.save={out / 'run'}"])
    assert Trainer(cfg).train()["exit_code"] == 0
    return {"run": out / "run", "pair": pair}


def test_gpt2_pair_run_loads_exports_and_matches_transformers(gpt2_run, tmp_path, corpus_paths):
    """The checkpoint loads with its vocab/merges tokenizer; the HF export carries the pair in
    the layout AutoTokenizer reads, which encodes real text as ours does, and LlamaForCausalLM
    gives our logits on it; the latent export reads its tokenizer back from that layout."""
    from tests.conftest import require
    transformers = require("transformers")
    from megatron_latentcot.cli.export_hf import main as export_main
    from megatron_latentcot.data.corpus import read_jsonl_texts
    from megatron_latentcot.data.tokenizer import build_tokenizer
    from megatron_latentcot.inference.decoder import training_forward
    from megatron_latentcot.inference.generate import generate_text
    from megatron_latentcot.inference.loading import LoadError, load_model

    pair = build_tokenizer("GPT2BPETokenizer", vocab_file=gpt2_run["pair"] / "vocab.json",
                           merge_file=gpt2_run["pair"] / "merges.txt")
    model = load_model(gpt2_run["run"])
    tok = model.tokenizer
    assert tok is not None and (tok.tokenizer_type, tok.fingerprint) == ("gpt2bpe", pair.fingerprint)
    assert model.vocab_size == 50304 and model.source["iteration"] == 3
    texts, _ = generate_text(model, ["Fellow citizens of the Senate"], 6)
    assert texts[0] and isinstance(texts[0], str)
    with pytest.raises(LoadError, match="not found"):
        load_model(gpt2_run["run"], tokenizer_model=tmp_path / "missing")

    assert export_main([str(gpt2_run["run"]), "--output", str(tmp_path / "hf")]) == 0
    hf_dir = tmp_path / "hf"
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in hf_dir.iterdir()}
    assert (hf_dir / "merges.txt").read_bytes() == (gpt2_run["pair"] / "merges.txt").read_bytes()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    docs = read_jsonl_texts(corpus_paths.heldout)[:2] + read_jsonl_texts(corpus_paths.valid)[:2]
    for doc in docs:
        text = doc[:4000]
        ids = tok.encode(text)
        assert hf_tok(text, add_special_tokens=True)["input_ids"] == ids
        assert hf_tok.decode(ids) == tok.decode(ids) == text
    assert hf_tok.eos_token_id == tok.eod == 50256
    hf = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir)).eval()
    toks = torch.tensor([tok.encode(docs[0])[:48]])  # within max_position_embeddings
    with torch.no_grad():
        ref = hf(toks).logits
    ours = training_forward(model.scheduler, toks).logits[..., :ref.shape[-1]]
    err = (ours - ref).abs().max().item()
    assert err < 2e-5, err

    assert export_main([str(gpt2_run["run"]), "--output", str(tmp_path / "latent"),
                        "--format", "latent"]) == 0
    meta = json.loads((tmp_path / "latent" / "latent_config.json").read_text())
    assert meta["tokenizer"]["type"] == "gpt2bpe" and meta["tokenizer"]["file"] == "."
    back = load_model(tmp_path / "latent")
    assert back.tokenizer is not None and back.tokenizer.fingerprint == pair.fingerprint
    assert generate_text(back, ["Fellow citizens of the Senate"], 6)[0] == texts


def test_generate_and_evaluate_tools_on_the_gpt2_pair_run(gpt2_run, tmp_path):
    """tools/generate.py and tools/evaluate.py on that run: text in, text out, with its
    vocab/merges tokenizer found from the checkpoint alone."""
    from megatron_latentcot.cli.evaluate import main as evaluate_main
    from megatron_latentcot.cli.generate import main as generate_main
    from megatron_latentcot.data.tokenizer import build_tokenizer

    tok = build_tokenizer("GPT2BPETokenizer", gpt2_run["pair"])
    prompt = "Fellow citizens of the Senate"
    assert generate_main([str(gpt2_run["run"]), "--prompt", prompt, "--max-new-tokens", "5",
                          "--json", str(tmp_path / "gen.json")]) == 0
    gen = json.loads((tmp_path / "gen.json").read_text())["generations"][0]
    assert gen["output"] and 1 <= len(gen["steps"]) <= 5
    fixtures = Path(__file__).parent / "fixtures"
    assert evaluate_main([str(gpt2_run["run"]), "--jsonl",
                          f"passages={fixtures / 'lambada_sotu.jsonl'}", "--max-docs", "2",
                          "--window", "32", "--no-default-data",
                          "--output-dir", str(tmp_path / "eval")]) == 0
    ppl = json.loads((tmp_path / "eval" / "results.json").read_text())["perplexity"]["passages"]
    from megatron_latentcot.data.corpus import read_jsonl_texts

    docs = read_jsonl_texts(fixtures / "lambada_sotu.jsonl")[:2]
    assert ppl["docs"] == 2 and ppl["tokens"] == sum(len(tok.encode(d)) for d in docs)


def test_mor_latent_export_keeps_its_settings(tmp_path):
    """A MoR model exports as ``latent`` (never as a plain Llama, whatever N_r) and loads back
    with its ``mor`` section (here token-choice routing), computing the same logits."""
    from megatron_latentcot.cli.export_hf import main as export_main
    from megatron_latentcot.inference.decoder import training_forward
    from megatron_latentcot.inference.loading import load_model

    overrides = [f"model.vocab_size={VOCAB}", "model.num_layers=4", "latent.method=mor",
                 "latent.max_steps=2", "mor.num_recursion=2", "mor.router=token"]
    save_world_of_one(tmp_path / "run", overrides, VOCAB)
    with pytest.raises(ValueError, match="not a plain Llama"):
        export_main([str(tmp_path / "run"), str(tmp_path / "hf"), "--format", "hf"])
    assert export_main([str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    loaded = load_model(tmp_path / "out")
    ref = reference_model(overrides, VOCAB)
    assert loaded.cfg.mor == ref.cfg.mor and loaded.cfg.mor.router == "token"
    assert_same_weights(loaded, ref)
    toks = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(1))
    a, b = training_forward(loaded.scheduler, toks), training_forward(ref.scheduler, toks)
    assert torch.equal(a.logits, b.logits)
