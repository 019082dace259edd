"""The pretraining loop on real text: loss falls, resume is exact, the router stays adaptive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist_utils import run_distributed

TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=160", "data.seq_length=64",
        "train.micro_batch_size=4", "train.global_batch_size=8", "train.lr=3e-3",
        "train.min_lr=3e-4", "train.lr_warmup_iters=5", "train.log_interval=5",
        "train.eval_iters=2", "train.eval_interval=0"]


@pytest.fixture(scope="module")
def sotu_data(tmp_path_factory, corpus_paths, sp_tokenizer_path) -> dict[str, str]:
    """40 training addresses and the validation addresses as indexed datasets."""
    from megatron_latentcot.cli.preprocess_data import main as preprocess

    out = tmp_path_factory.mktemp("sotu")
    lines = Path(corpus_paths.train).read_text().splitlines()
    subset = out / "train.jsonl"
    subset.write_text("\n".join(lines[:40]) + "\n")
    paths = {}
    for name, src in (("train", subset), ("valid", Path(corpus_paths.valid))):
        assert preprocess(["--input", str(src), "--output-prefix", str(out / name),
                           "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                           str(sp_tokenizer_path), "--append-eod", "--workers", "1"]) == 0
        paths[name] = str(out / f"{name}_text_document")
    paths["tokenizer"] = str(sp_tokenizer_path)
    return paths


def data_overrides(d: dict[str, str]) -> list[str]:
    return [f"data.data_path=[{d['train']}]", f"data.valid_path={d['valid']}",
            f"data.tokenizer_model={d['tokenizer']}"]


def _train(overrides: list[str]) -> dict:
    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed
    from megatron_latentcot.training.loop import Trainer

    trainer = Trainer(load_config(None, overrides))
    result = trainer.train()
    destroy_distributed()
    return result


def test_vanilla_loss_falls_on_real_text(sotu_data, tmp_path):
    result = run_distributed(_train, 1, TINY + data_overrides(sotu_data) + [
        "train.train_iters=40", f"train.save={tmp_path}"])[0]
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    assert result["valid_ppl"] < 8192 / 4  # far below a uniform guess over the vocabulary
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "valid"} <= {r["split"] for r in logged}


def test_resume_in_a_new_process_is_exact(sotu_data, tmp_path):
    """6 straight iterations == 3, save, a new process, 3 more (losses bit for bit)."""
    base = TINY + data_overrides(sotu_data) + ["train.train_iters=6"]
    straight = run_distributed(_train, 1, base + [f"train.save={tmp_path / 'a'}"])[0]
    first = run_distributed(_train, 1, base + ["train.train_iters=3",
                                               f"train.save={tmp_path / 'b'}"])[0]
    second = run_distributed(_train, 1, base + [f"train.save={tmp_path / 'b'}",
                                                f"train.load={tmp_path / 'b'}"])[0]
    assert first["losses"] + second["losses"] == straight["losses"]
    assert (tmp_path / "b" / "latest").read_text().strip() == "iter_0000006"


def test_adaptive_trains_and_router_stays_adaptive(sotu_data, tmp_path):
    result = run_distributed(_train, 1, TINY + data_overrides(sotu_data) + [
        "latent.method=adaptive", "latent.max_steps=3", "latent.tau=0.3",
        "model.embedding_multiplier=null",
        "train.train_iters=30", f"train.save={tmp_path}"])[0]
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["mean_steps"] for r in logged if r["split"] == "train"]
    # Never collapses to the token pass alone, and halts tokens early while it learns. At this
    # size later steps keep helping, so the router may end up running every token to K (seen
    # for 4 of 4 seeds at tau 0.3, and for both seeds tried with the previous initialisation):
    # that is the method working, not a collapse, so "always below K" would be seed luck.
    assert all(1.0 < s <= 3.0 for s in steps), steps
    assert any(s < 2.9 for s in steps), steps


@pytest.mark.parametrize("method", ["latent_fixed", "looped", "pondering", "pause", "ponderlm2"])
def test_every_baseline_trains_on_real_text(sotu_data, tmp_path, method):
    result = run_distributed(_train, 1, TINY + data_overrides(sotu_data) + [
        f"latent.method={method}", "latent.max_steps=2", "model.embedding_multiplier=null",
        "train.train_iters=15", f"train.save={tmp_path}"])[0]
    losses = result["losses"]
    assert all(x == x and abs(x) < 100 for x in losses), losses  # finite
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
