"""megatron_latentcot.data.dataset: sample properties on real data, blending, splits, sampler."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_latentcot.cli.preprocess_data import main as preprocess_main
from megatron_latentcot.config import DataConfig
from megatron_latentcot.data.dataset import (
    DatasetError,
    MicroBatchSampler,
    build_datasets,
    collate,
    micro_batches,
)
from megatron_latentcot.data.indexed import IndexedDatasetError, IndexedReader

SEQ = 64


def preprocess(src: Path, prefix: Path, tokenizer_path: str) -> str:
    rc = preprocess_main(["--input", str(src), "--output-prefix", str(prefix), "--tokenizer-type",
                          "sentencepiece", "--tokenizer-model", tokenizer_path, "--append-eod"])
    assert rc == 0
    return f"{prefix}_text_document"


def head_jsonl(src: Path, dst: Path, n: int, chars: int | None = None) -> Path:
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as o:
        for _, line in zip(range(n), f):
            if chars is not None:
                line = json.dumps({"text": json.loads(line)["text"][:chars]}) + "\n"
            o.write(line)
    return dst


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dataset")


@pytest.fixture(scope="module")
def sotu(data_dir, corpus_paths, sp_tokenizer) -> str:
    """30 real addresses (first 6,000 characters of each: about 45k tokens)."""
    src = head_jsonl(corpus_paths.train, data_dir / "sotu30.jsonl", 30, chars=6000)
    return preprocess(src, data_dir / "sotu30", sp_tokenizer.path)


@pytest.fixture(scope="module")
def heldout(data_dir, corpus_paths, sp_tokenizer) -> str:
    """Moby Dick chapters: a second, different source for blending."""
    src = head_jsonl(corpus_paths.heldout, data_dir / "moby.jsonl", 40, chars=4000)
    return preprocess(src, data_dir / "moby", sp_tokenizer.path)


def cfg(paths: list[str], tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataConfig(data_path=paths, seq_length=SEQ, **kw)


def concat(prefix: str, document_index: np.ndarray) -> np.ndarray:
    reader = IndexedReader(prefix)
    docs = reader.documents()
    return np.concatenate([docs[int(d)] for d in document_index]).astype(np.int64)


# --------------------------------------------------------------------------- sample content


def test_samples_are_packed_windows_of_shuffled_documents(tmp_path, sotu, sp_tokenizer):
    train, valid, test = build_datasets(cfg([sotu], tmp_path), sp_tokenizer, SEQ, (300, 0, 0), 7)
    assert valid is None and test is None and len(train) >= 300
    inner = train.megatron
    stream = concat(sotu, inner.document_index)  # the epoch's documents, end to end
    for idx in range(len(train)):
        s = train[idx]
        assert s["tokens"].shape == s["labels"].shape == s["loss_mask"].shape == (SEQ,)
        assert s["tokens"].dtype == s["labels"].dtype == torch.int64
        assert s["loss_mask"].dtype == torch.float32 and bool((s["loss_mask"] == 1).all())
        j = int(inner.shuffle_index[idx])
        window = torch.from_numpy(stream[j * SEQ: j * SEQ + SEQ + 1])
        assert torch.equal(s["tokens"], window[:-1]) and torch.equal(s["labels"], window[1:])
    # one epoch: the windows tile the stream, and every train document is in it once
    assert sorted(inner.shuffle_index.tolist()) == list(range(len(train)))
    assert sorted(inner.document_index.tolist()) == sorted(inner.indices.tolist())
    assert "doc_ids" not in train[0]


def test_eod_masks_and_doc_ids(tmp_path, sotu, sp_tokenizer):
    train, _, _ = build_datasets(cfg([sotu], tmp_path, reset_attention_mask=True,
                                     eod_mask_loss=True), sp_tokenizer, SEQ, (300, 0, 0), 7)
    eod = sp_tokenizer.eod
    with_eod = 0
    for idx in range(len(train)):
        s = train[idx]
        is_eod = s["tokens"] == eod
        assert torch.equal(s["loss_mask"], (~is_eod).float())
        d = s["doc_ids"]
        assert d.dtype == torch.int64 and int(d[0]) == 0
        assert torch.equal(d[1:] - d[:-1], is_eod[:-1].long())  # new document right after EOD
        with_eod += bool(is_eod[:-1].any())
    assert with_eod >= 10  # the property was exercised, not vacuous


def test_deterministic_across_builds_and_seeded(tmp_path, sotu, sp_tokenizer):
    a = build_datasets(cfg([sotu], tmp_path / "a"), sp_tokenizer, SEQ, (200, 20, 0), 3)
    b = build_datasets(cfg([sotu], tmp_path / "b"), sp_tokenizer, SEQ, (200, 20, 0), 3)
    c = build_datasets(cfg([sotu], tmp_path / "a"), sp_tokenizer, SEQ, (200, 20, 0), 4)
    for split in (0, 1):
        assert len(a[split]) == len(b[split])
        for i in range(len(a[split])):
            assert torch.equal(a[split][i]["tokens"], b[split][i]["tokens"])
    assert not all(torch.equal(a[0][i]["tokens"], c[0][i]["tokens"]) for i in range(20))


def test_index_cache_reused_then_rebuilt_when_data_changes(tmp_path, data_dir, sotu,
                                                           sp_tokenizer, corpus_paths):
    prefix_base = tmp_path / "changing"
    src = head_jsonl(corpus_paths.train, tmp_path / "a.jsonl", 12, chars=3000)
    prefix = preprocess(src, prefix_base, sp_tokenizer.path)
    config = cfg([prefix], tmp_path)
    first = build_datasets(config, sp_tokenizer, SEQ, (50, 0, 0), 1)[0]
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any(n.endswith("shuffle_index.npy") for n in cached)
    again = build_datasets(config, sp_tokenizer, SEQ, (50, 0, 0), 1)[0]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached  # a cache hit
    assert all(torch.equal(first[i]["tokens"], again[i]["tokens"]) for i in range(len(first)))
    # same path, different documents: a stale index would point past the data or at wrong docs
    src = head_jsonl(corpus_paths.valid, tmp_path / "b.jsonl", 5, chars=2000)
    preprocess(src, prefix_base, sp_tokenizer.path)
    fresh = build_datasets(config, sp_tokenizer, SEQ, (50, 0, 0), 1)[0]
    stream = concat(prefix, fresh.megatron.document_index)
    for i in range(len(fresh)):
        j = int(fresh.megatron.shuffle_index[i])
        assert fresh[i]["tokens"].tolist() == stream[j * SEQ: j * SEQ + SEQ].tolist()


# --------------------------------------------------------------------------- splits, blends


def test_split_by_document_ratio_is_disjoint(tmp_path, sotu, sp_tokenizer):
    train, valid, test = build_datasets(cfg([sotu], tmp_path, split="60,30,10"), sp_tokenizer,
                                        SEQ, (100, 50, 10), 5)
    docs = [set(ds.megatron.indices.tolist()) for ds in (train, valid, test)]
    assert [len(d) for d in docs] == [18, 9, 3]  # of 30 documents
    assert not (docs[0] & docs[1]) and not (docs[0] & docs[2]) and not (docs[1] & docs[2])
    assert set().union(*docs) == set(range(30))
    for ds, d in zip((train, valid, test), docs):
        assert set(ds.megatron.document_index.tolist()) <= d
        stream = concat(sotu, ds.megatron.document_index)
        j = int(ds.megatron.shuffle_index[0])
        assert ds[0]["tokens"].tolist() == stream[j * SEQ: j * SEQ + SEQ].tolist()


def test_blend_proportions_follow_weights(tmp_path, sotu, heldout, sp_tokenizer):
    import torch.distributed as dist

    n = 2000
    had_group = dist.is_initialized()  # another test of this process may have started one
    train, valid, _ = build_datasets(cfg(["0.7", sotu, "0.3", heldout], tmp_path), sp_tokenizer,
                                     SEQ, (n, 40, 0), 11)
    assert dist.is_initialized() == had_group  # a temporary gloo group is gone again
    ids = np.asarray(train.megatron.dataset_index)
    assert len(train) >= n
    assert abs(float(np.mean(ids == 0)) - 0.7) < 0.01
    assert abs(float(np.mean(ids[:200] == 0)) - 0.7) < 0.02  # interleaved, not in blocks
    sample_ids = np.asarray(train.megatron.dataset_sample_index)
    for i in range(0, len(train), 97):
        src = train.megatron.datasets[ids[i]]
        assert torch.equal(train[i]["tokens"], src[int(sample_ids[i])]["tokens"])
    assert set(train[0]) == {"tokens", "labels", "loss_mask"}
    assert abs(float(np.mean(np.asarray(valid.megatron.dataset_index) == 0)) - 0.7) < 0.05


def test_zero_weight_prefix_is_left_out(tmp_path, sotu, heldout, sp_tokenizer):
    train, _, _ = build_datasets(cfg(["1", sotu, "0", heldout], tmp_path), sp_tokenizer, SEQ,
                                 (100, 0, 0), 1)
    assert len(train) >= 100


def test_epochs_when_samples_exceed_one_pass(tmp_path, sotu, sp_tokenizer):
    one = build_datasets(cfg([sotu], tmp_path), sp_tokenizer, SEQ, (1, 0, 0), 2)[0]
    per_epoch = len(one)
    want = int(per_epoch * 2.5)
    many = build_datasets(cfg([sotu], tmp_path), sp_tokenizer, SEQ, (want, 0, 0), 2)[0]
    assert len(many) >= want
    counts = np.bincount(many.megatron.document_index, minlength=30)
    train_docs = many.megatron.indices
    assert set(counts[train_docs].tolist()) == {3}  # every document, three epochs
    last = many[len(many) - 1]
    assert last["tokens"].shape == (SEQ,)


# --------------------------------------------------------------------------- sampler


def test_sampler_rank_assignment_and_disjoint_ranks():
    mbs, dp, consumed = 3, 2, 6
    per_rank = [list(MicroBatchSampler(50, consumed, mbs, r, dp)) for r in range(dp)]
    for r in range(dp):
        for batch in per_rank[r]:
            assert len(batch) == mbs
            assert all(((i - consumed) // mbs) % dp == r for i in batch)
    flat = [i for r in per_rank for b in r for i in b]
    assert len(flat) == len(set(flat))
    assert sorted(flat) == list(range(consumed, consumed + (50 - consumed) // 6 * 6))
    assert len(MicroBatchSampler(50, consumed, mbs, 0, dp)) == len(per_rank[0]) == 7


def test_resume_equals_uninterrupted(tmp_path, sotu, sp_tokenizer):
    config = cfg([sotu], tmp_path)
    train = build_datasets(config, sp_tokenizer, SEQ, (120, 0, 0), 9)[0]
    mbs, dp = 2, 2
    for rank in range(dp):
        full = list(micro_batches(train, 0, mbs, rank, dp))
        steps_done = 7
        rebuilt = build_datasets(config, sp_tokenizer, SEQ, (120, 0, 0), 9)[0]  # a new process
        resumed = list(micro_batches(rebuilt, steps_done * mbs * dp, mbs, rank, dp))
        assert len(resumed) == len(full) - steps_done
        for a, b in zip(full[steps_done:], resumed):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)
    batch = full[0]
    assert batch["tokens"].shape == (mbs, SEQ) and batch["loss_mask"].dtype == torch.float32
    r0 = {tuple(t.tolist()) for b in micro_batches(train, 0, mbs, 0, dp) for t in b["tokens"]}
    r1 = {tuple(t.tolist()) for b in micro_batches(train, 0, mbs, 1, dp) for t in b["tokens"]}
    assert not r0 & r1


def test_sampler_as_dataloader_batch_sampler(tmp_path, sotu, sp_tokenizer):
    train = build_datasets(cfg([sotu], tmp_path), sp_tokenizer, SEQ, (40, 0, 0), 9)[0]
    loader = torch.utils.data.DataLoader(
        train, batch_sampler=MicroBatchSampler(len(train), 8, 4, 1, 2), collate_fn=collate)
    for a, b in zip(loader, micro_batches(train, 8, 4, 1, 2)):
        assert torch.equal(a["tokens"], b["tokens"])


def test_sampler_errors():
    with pytest.raises(DatasetError, match="exhausted"):
        MicroBatchSampler(10, 10, 2, 0, 1)
    with pytest.raises(DatasetError, match="dp_rank"):
        MicroBatchSampler(10, 0, 2, 2, 2)
    with pytest.raises(DatasetError, match="micro_batch_size"):
        MicroBatchSampler(10, 0, 0, 0, 1)


# --------------------------------------------------------------------------- bad input


def test_zero_token_dataset_is_rejected(tmp_path, sp_tokenizer):
    """GPTDataset would loop forever looking for tokens; we refuse first."""
    src = tmp_path / "empty_docs.jsonl"
    src.write_text('{"text": ""}\n' * 4)
    prefix = preprocess(src, tmp_path / "empty", sp_tokenizer.path)
    with pytest.raises(DatasetError, match=r"empty_text_document: dataset holds no tokens"):
        build_datasets(cfg([prefix], tmp_path), sp_tokenizer, SEQ, (10, 0, 0), 1)


def test_split_without_documents_is_rejected(tmp_path, corpus_paths, sp_tokenizer):
    src = head_jsonl(corpus_paths.valid, tmp_path / "three.jsonl", 3, chars=2000)
    prefix = preprocess(src, tmp_path / "three", sp_tokenizer.path)
    with pytest.raises(DatasetError, match=r"three_text_document: the valid split \(documents "
                                           r"3\.\.3 of 3"):
        build_datasets(cfg([prefix], tmp_path), sp_tokenizer, SEQ, (10, 5, 0), 1)
    with pytest.raises(DatasetError, match="gives the test split no documents"):
        build_datasets(cfg([prefix], tmp_path, split="100,0,0"), sp_tokenizer, SEQ,
                       (10, 0, 1), 1)
    train, valid, test = build_datasets(cfg([prefix], tmp_path), sp_tokenizer, SEQ, (10, 0, 0), 1)
    assert len(train) >= 10 and valid is None and test is None


def test_wrong_tokenizer_and_corrupt_data(tmp_path, sotu, sp_tokenizer, hf_tokenizer):
    with pytest.raises(IndexedDatasetError, match="dataset was built with tokenizer"):
        build_datasets(cfg([sotu], tmp_path), hf_tokenizer, SEQ, (10, 0, 0), 1)
    broken = tmp_path / "broken"
    for ext in (".bin", ".idx"):
        (tmp_path / f"broken{ext}").write_bytes(Path(sotu + ext).read_bytes()[:-8])
    with pytest.raises(IndexedDatasetError, match=r"broken\.idx: truncated index"):
        build_datasets(cfg([str(broken)], tmp_path), sp_tokenizer, SEQ, (10, 0, 0), 1)
    with pytest.raises(IndexedDatasetError, match=r"nowhere\.idx: index file not found"):
        build_datasets(cfg([str(tmp_path / "nowhere")], tmp_path), sp_tokenizer, SEQ,
                       (10, 0, 0), 1)


def test_token_id_beyond_the_vocabulary_without_metadata(tmp_path, sp_tokenizer):
    """A dataset with no .meta.json (e.g. written by Megatron-LM) is scanned for ids the
    tokenizer (and so the model: model.vocab_size >= the tokenizer's) does not have; with
    TP > 1 such an id would be silently masked to a zero embedding and a zero logit."""
    from megatron_latentcot.data.indexed import IndexedWriter

    vocab = sp_tokenizer.vocab_size
    for name, bad in (("ok", vocab - 1), ("beyond", vocab + 904)):
        with IndexedWriter(tmp_path / name, 2 * vocab) as w:  # no metadata
            for i in range(40):
                w.add_document([(7 * i + j) % vocab for j in range(50)] + [bad])
            w.finalize()
    train, _, _ = build_datasets(cfg([str(tmp_path / "ok")], tmp_path), sp_tokenizer, SEQ,
                                 (10, 0, 0), 1)
    assert len(train) >= 10
    with pytest.raises(IndexedDatasetError, match=rf"beyond\.bin: token ids span \[0, "
                       rf"{vocab + 904}\], outside the vocabulary \[0, {vocab}\)"):
        build_datasets(cfg([str(tmp_path / "beyond")], tmp_path), sp_tokenizer, SEQ, (10, 0, 0), 1)


def _tokens(ds) -> list[list[int]]:
    return [ds[i]["tokens"].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("blend", [False, True])
def test_killed_cache_write_is_rebuilt_on_restart(tmp_path, sotu, heldout, sp_tokenizer, blend):
    """A .npy cut short (a build killed while numpy.save wrote it) is detected and rebuilt by
    the next start, with the same samples; in a blend both megatron-core caches (per dataset
    and the blend's own) are covered."""
    paths = ["0.6", sotu, "0.4", heldout] if blend else [sotu]
    first = _tokens(build_datasets(cfg(paths, tmp_path), sp_tokenizer, SEQ, (30, 0, 0), 1)[0])
    cache = tmp_path / "cache"
    damaged = sorted(cache.glob("*shuffle_index.npy")) + sorted(cache.glob("*dataset_index.npy"))
    assert len(damaged) == (3 if blend else 1)
    for f in damaged:
        f.write_bytes(f.read_bytes()[:100])
    again = _tokens(build_datasets(cfg(paths, tmp_path), sp_tokenizer, SEQ, (30, 0, 0), 1)[0])
    assert again == first
    assert all(np.load(f).size for f in damaged)  # rewritten whole
    assert not list(cache.glob(".staging-*"))


def test_cache_is_published_only_when_complete(tmp_path, sotu, sp_tokenizer, monkeypatch):
    """A build interrupted while it writes leaves no cache file under its final name (the
    previous behaviour: a half-written .npy that every later start tried to load)."""
    real_save = np.save

    def save_half_then_die(path, arr, *a, **k):
        if str(path).endswith("sample_index.npy"):
            with open(path, "wb") as f:
                f.write(b"\x93NUMPY")
            raise KeyboardInterrupt  # as if killed
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(np, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_datasets(cfg([sotu], tmp_path), sp_tokenizer, SEQ, (30, 0, 0), 1)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(np, "save", real_save)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "cache" / f".staging-{socket.gethostname()}-{dead.pid}"  # a SIGKILLed build
    stale.mkdir()
    train, _, _ = build_datasets(cfg([sotu], tmp_path), sp_tokenizer, SEQ, (30, 0, 0), 1)
    assert len(train) >= 30 and len(list((tmp_path / "cache").glob("*.npy"))) == 3
    assert not stale.exists()


def test_bad_arguments(tmp_path, sotu, sp_tokenizer):
    with pytest.raises(DatasetError, match="data_path is empty"):
        build_datasets(cfg([], tmp_path), sp_tokenizer, SEQ, (10, 0, 0), 1)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DatasetError, match="cache_dir"):
        build_datasets(cfg([sotu], tmp_path, cache_dir=str(blocker / "c")), sp_tokenizer, SEQ,
                       (10, 0, 0), 1)
    with pytest.raises(DatasetError, match="num_samples"):
        build_datasets(cfg([sotu], tmp_path), sp_tokenizer, SEQ, (10, -1, 0), 1)


def _build_on_rank(paths: list[str], cache_dir: str, tokenizer_path: str) -> list[list[int]]:
    import torch.distributed as dist

    from megatron_latentcot.data.tokenizer import build_tokenizer

    dist.init_process_group("gloo")
    try:
        tok = build_tokenizer("sentencepiece", tokenizer_path)
        config = DataConfig(data_path=paths, seq_length=SEQ, cache_dir=cache_dir)
        if dist.get_rank() != 0:  # rank 0 alone validates and hashes the data: others are told
            _forbid_reading_data()
        train, valid, _ = build_datasets(config, tok, SEQ, (300, 30, 0), 21)
        assert dist.is_initialized()  # the caller's group is left alone
        return [train[i]["tokens"].tolist() for i in range(0, 300, 7)] + \
            [valid[i]["tokens"].tolist() for i in range(30)]
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _forbid_reading_data() -> None:
    import megatron_latentcot.data.dataset as ds

    def forbidden(*args, **kwargs):
        raise AssertionError(f"rank {torch.distributed.get_rank()} read the data itself")

    ds.sha256_file = ds.validate_indexed = ds.check_tokenizer = forbidden


def _error_on_rank(prefix: str, cache_dir: str, tokenizer_path: str) -> str:
    import torch.distributed as dist

    from megatron_latentcot.data.tokenizer import build_tokenizer

    dist.init_process_group("gloo")
    try:
        if dist.get_rank() != 0:
            _forbid_reading_data()
        config = DataConfig(data_path=[prefix], seq_length=SEQ, cache_dir=cache_dir)
        try:
            build_datasets(config, build_tokenizer("sentencepiece", tokenizer_path), SEQ,
                           (10, 0, 0), 1)
        except (DatasetError, IndexedDatasetError) as e:
            return str(e)
        return "no error"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_rank_zeros_data_error_is_every_ranks(tmp_path, sp_tokenizer):
    """A dataset rank 0 rejects (ids beyond the vocabulary, found by the scan only rank 0
    runs) fails every rank with rank 0's message, instead of leaving them waiting."""
    from dist_utils import run_distributed

    from megatron_latentcot.data.indexed import IndexedWriter

    vocab = sp_tokenizer.vocab_size
    with IndexedWriter(tmp_path / "beyond", 2 * vocab) as w:  # no metadata: scanned
        for i in range(40):
            w.add_document([(5 * i + j) % vocab for j in range(50)] + [vocab + 3])
        w.finalize()
    messages = run_distributed(_error_on_rank, 2, str(tmp_path / "beyond"),
                               str(tmp_path / "cache"), sp_tokenizer.path)
    assert messages[0] == messages[1] and "outside the vocabulary" in messages[0], messages


@pytest.mark.slow
def test_identical_on_every_data_parallel_rank(tmp_path, sotu, heldout, sp_tokenizer):
    """Two gloo ranks sharing one cache dir (rank 0 builds, rank 1 loads) see the same samples,
    equal to a single-process build."""
    from dist_utils import run_distributed

    paths = ["0.6", sotu, "0.4", heldout]
    ranks = run_distributed(_build_on_rank, 2, paths, str(tmp_path / "shared"), sp_tokenizer.path)
    assert ranks[0] == ranks[1]
    train, valid, _ = build_datasets(cfg(paths, tmp_path), sp_tokenizer, SEQ, (300, 30, 0), 21)
    single = [train[i]["tokens"].tolist() for i in range(0, 300, 7)] + \
        [valid[i]["tokens"].tolist() for i in range(30)]
    assert ranks[0] == single
