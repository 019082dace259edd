"""Import transformers Llama checkpoints, check them against transformers, continue pretraining.

Checkpoints are random ``LlamaForCausalLM``s saved locally (no model hub): GQA, RoPE theta 5e5,
RMSNorm eps 1e-5, Llama-3 RoPE scaling, tied and untied, fp32 and bf16, sharded safetensors. The
vocabulary (200) is not a multiple of 128, so the imported model carries padding rows that must
never be predicted.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import require
from tests.dist_utils import run_distributed

if importlib.util.find_spec("transformers") is None:  # not imported here: spawned ranks
    require("transformers")  # import this module and need no transformers (seconds each)

VOCAB, WORDS = 200, 150  # the model's vocabulary; the tokenizer's (ids < WORDS)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def write_tokenizer(path: Path, words: int = WORDS) -> Path:
    """A word-level tokenizer.json: ``</s>`` (EOD), ``<unk>``, then w0, w1, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"</s>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(words - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def make_hf(out: Path, tie: bool = False, dtype: torch.dtype = torch.float32,
            rope_scaling: dict | None = None, shard: bool = True) -> Path:
    """A random LlamaForCausalLM (norm weights random too) with its tokenizer, saved in ``out``."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=5e5, rope_scaling=rope_scaling, tie_word_embeddings=tie,
        initializer_range=0.1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(str(out), max_shard_size="100KB" if shard else "1GB")
    write_tokenizer(out / "tokenizer.json")
    return out


def hf_reference(path: Path):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_loss(path: Path, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        logits = hf_reference(path)(tokens).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1)).item()


def import_run(src: Path, out: Path, *args: str) -> Path:
    from megatron_latentcot.cli.import_hf import main

    assert main([str(src), "--output", str(out), *args]) == 0
    return out


@pytest.mark.parametrize("tie,dtype,rope", [
    (False, torch.float32, LLAMA3), (True, torch.bfloat16, None)],
    ids=["untied-fp32-llama3-rope", "tied-bf16"])
def test_logits_equal_transformers_and_export_gives_back_the_tensors(tmp_path, tie, dtype, rope):
    from megatron_latentcot.cli.export_hf import main as export_main
    from megatron_latentcot.inference.decoder import training_forward
    from megatron_latentcot.inference.loading import load_model
    from megatron_latentcot.model.hf_import import read_hf_weights

    src = make_hf(tmp_path / "hf", tie=tie, dtype=dtype, rope_scaling=rope)
    assert len(list(src.glob("*.safetensors"))) > 1  # sharded, with an index
    run = import_run(src, tmp_path / "run")
    model = load_model(run)
    m = model.cfg.model
    assert (model.vocab_size, m.predicted_vocab_size, m.tie_embeddings) == (256, VOCAB, tie)
    assert (m.rope_theta, m.norm_eps, m.kv_heads, m.embedding_multiplier) == (5e5, 1e-5, 2, 1.0)
    assert m.rope_scaling == (rope and "llama3")
    assert model.tokenizer is not None and model.tokenizer.vocab_size == WORDS
    tokens = torch.randint(0, WORDS, (2, 48), generator=torch.Generator().manual_seed(1))
    ours = training_forward(model.scheduler, tokens).logits
    with torch.no_grad():
        ref = hf_reference(src)(tokens).logits
    assert torch.isneginf(ours[..., VOCAB:]).all()  # padding rows: never predicted
    err = (ours[..., :VOCAB] - ref).abs().max().item()
    assert err < 2e-5, err

    name = str(dtype).removeprefix("torch.")
    assert export_main([str(run), "--output", str(tmp_path / "back"), "--dtype", name]) == 0
    original, _ = read_hf_weights(src)
    back, _ = read_hf_weights(tmp_path / "back")
    assert set(back) == set(original)
    for key, t in original.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key
    a, b = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "back"))
    for key in ("vocab_size", "rope_parameters", "rms_norm_eps", "tie_word_embeddings",
                "num_key_value_heads"):
        assert a[key] == b[key], key


def _parallel_loss(source: str, config: str, overrides: list[str], tokens: torch.Tensor,
                   labels: torch.Tensor) -> float:
    """The imported model's mean LM loss under a parallel layout, started by train.init_from."""
    from megatron_latentcot.config import load_config
    from megatron_latentcot.data.tokenizer import build_tokenizer
    from megatron_latentcot.parallel import destroy_distributed, init_distributed
    from megatron_latentcot.training import init_from
    from megatron_latentcot.training.loop import Engine
    from megatron_latentcot.vocab import padded_vocab_size

    cfg = load_config(config, overrides)
    ctx = init_distributed(cfg.parallel)
    tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    rows = padded_vocab_size(cfg.model, tok.vocab_size, ctx.tp_size)
    engine = Engine(cfg, ctx, rows)
    init_from.initialize(source, cfg, ctx, engine.model, engine.optimizer.layouts, rows,
                         tok.fingerprint)
    mb = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(tokens.shape)}
    loss = engine.eval_loss([mb])
    destroy_distributed()
    return loss


@pytest.mark.slow
@pytest.mark.parametrize("layout,from_hf,world", [
    (["parallel.tensor_model_parallel_size=2"], True, 2),
    (["parallel.pipeline_model_parallel_size=2", "latent.method=adaptive",
      "latent.max_steps=1"], False, 2),
    (["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"],
     False, 4),
    (["parallel.zero=fsdp2"], True, 2),
], ids=["tp2-vanilla-from-hf-dir", "pp2-adaptive-max-steps-1-from-run", "tp2xpp2-from-run",
        "dp2-fsdp2-from-hf-dir"])
def test_parallel_layouts_give_transformers_loss(tmp_path, layout, from_hf, world):
    src = make_hf(tmp_path / "hf", rope_scaling=LLAMA3)
    run = import_run(src, tmp_path / "run")
    tokens = torch.randint(0, WORDS, (2, 33), generator=torch.Generator().manual_seed(2))
    tokens, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    source = src if from_hf else run
    losses = run_distributed(_parallel_loss, world, str(source), str(run / "config.yaml"),
                             layout, tokens, labels)
    ref = hf_loss(src, tokens, labels)
    assert len(set(losses)) == 1, losses
    assert abs(losses[0] - ref) < 1e-5, (losses, ref)


def _write_dataset(out: Path, tokenizer: Path) -> str:
    """Word sequences that follow a fixed cycle (learnable in a few steps), as a dataset."""
    from megatron_latentcot.cli.preprocess_data import main as preprocess

    rng = random.Random(0)
    lines = []
    for _ in range(60):
        start = rng.randrange(WORDS - 2)
        text = " ".join(f"w{(start + 7 * i) % (WORDS - 2)}" for i in range(120))
        lines.append(json.dumps({"text": text}))
    (out / "docs.jsonl").write_text("\n".join(lines) + "\n")
    assert preprocess(["--input", str(out / "docs.jsonl"), "--output-prefix", str(out / "docs"),
                       "--tokenizer-type", "huggingface", "--tokenizer-model", str(tokenizer),
                       "--append-eod", "--workers", "1"]) == 0
    return str(out / "docs_text_document")


def _continue(config: str, overrides: list[str]) -> dict:
    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed
    from megatron_latentcot.training.loop import Trainer

    result = Trainer(load_config(config, overrides)).train()
    destroy_distributed()
    return result


@pytest.mark.slow
def test_continue_pretraining_with_adaptive_latent_steps(tmp_path):
    src = make_hf(tmp_path / "hf", shard=False)
    prefix = _write_dataset(tmp_path, src / "tokenizer.json")
    run = import_run(src, tmp_path / "run", f"data.data_path=[{prefix}]", "data.seq_length=32",
                     "data.split=1,0,0")
    result = run_distributed(_continue, 1, str(run / "config.yaml"), [
        "latent.method=adaptive", "latent.max_steps=3", "latent.tau=0.3",
        "train.micro_batch_size=4", "train.global_batch_size=4", "train.train_iters=8",
        "train.lr=3e-3", "train.min_lr=3e-4", "train.lr_warmup_iters=2", "train.eval_iters=0",
        "train.eval_interval=0", "train.log_interval=4", f"train.save={tmp_path / 'cont'}"])[0]
    losses = result["losses"]
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses))), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    manifest = json.loads((tmp_path / "cont" / "iter_0000008" / "manifest.json").read_text())
    assert manifest["config"]["train"]["init_from"] == str(run.resolve())


def test_init_from_refuses_another_embedding_multiplier():
    from megatron_latentcot.config import load_config
    from megatron_latentcot.training.checkpoint import CheckpointError
    from megatron_latentcot.training.init_from import Source, check_compatible

    cfg = load_config(None, ["model.embedding_multiplier=null"])
    source = Source(Path("runs/x"), load_config(None, []).model, None, 256, lambda _: None, "")
    with pytest.raises(CheckpointError, match=r"model\.embedding_multiplier: 1\.0 -> None"):
        check_compatible(source, cfg, 256, "fingerprint")
    source.model.predicted_vocab_size = 200  # padding rows the source never predicted
    with pytest.raises(CheckpointError, match="predicted vocabulary: 200 -> 256"):
        check_compatible(source, load_config(None, []), 256, "fingerprint")
    check_compatible(source, load_config(None, ["model.predicted_vocab_size=200"]), 256, "f")


def _edit_config(path: Path, **changes) -> None:
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))


def test_bad_inputs_are_one_line_naming_the_file(tmp_path, capsys):
    from megatron_latentcot.cli.import_hf import main

    good = make_hf(tmp_path / "good")

    def refused(edit, *args: str) -> str:
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good, bad)
        edit(bad)
        capsys.readouterr()
        assert main([str(bad), "--output", str(tmp_path / "never"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and not (tmp_path / "never").exists(), err
        return err

    err = refused(lambda d: _edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    assert "config.json" in err and "not a Llama" in err
    assert "attention_bias" in refused(lambda d: _edit_config(d, attention_bias=True))
    assert "'yarn'" in refused(lambda d: _edit_config(
        d, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5}))
    shard = sorted(good.glob("model-*.safetensors"))[1].name
    err = refused(lambda d: (d / shard).unlink())
    assert shard in err and "missing" in err
    err = refused(lambda d: _edit_config(d, intermediate_size=128))
    assert ".safetensors" in err and "gate_proj" in err and "shape" in err

    other = tmp_path / "other"
    other.mkdir()
    prefix = _write_dataset(other, write_tokenizer(other / "tokenizer.json", words=120))
    err = refused(lambda d: None, f"data.data_path=[{prefix}]")
    assert "docs_text_document.meta.json" in err and "tokenizer" in err


def test_config_checks_rope_scaling_and_init_from():
    from megatron_latentcot.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.rope_scaling_factor: expected > 0"):
        load_config(None, ["model.rope_scaling=llama3"])
    with pytest.raises(ConfigError, match="model.rope_low_freq_factor: must be null"):
        load_config(None, ["model.rope_scaling=linear", "model.rope_scaling_factor=2.0",
                           "model.rope_low_freq_factor=1.0"])
    with pytest.raises(ConfigError, match="train.init_from .* and train.load"):
        load_config(None, ["train.init_from=runs/a", "train.load=runs/b"])
