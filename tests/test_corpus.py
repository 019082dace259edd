"""Default corpus: counts, the fixed validation split, caching, and checksum/npm errors."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from megatron_latentcot.cli import prepare_corpus as prepare_cli
from megatron_latentcot.data import corpus as corpus_mod
from megatron_latentcot.data.corpus import (
    EXPECTED_SHA256,
    SOTU_PACKAGE,
    VALID_ADDRESSES,
    CorpusChecksumError,
    CorpusError,
    NpmNotFoundError,
    prepare_corpus,
    read_sotu,
    sha256_file,
)


def _docs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_counts_and_split(corpus_paths) -> None:
    train, valid = _docs(corpus_paths.train), _docs(corpus_paths.valid)
    assert (len(train), len(valid)) == (221, 12)
    train_ids, valid_ids = [d["id"] for d in train], [d["id"] for d in valid]
    assert valid_ids == list(VALID_ADDRESSES)
    assert not set(train_ids) & set(valid_ids)
    assert len(set(train_ids) | set(valid_ids)) == 233
    # Texts are disjoint too (no address duplicated across the split), none empty.
    assert not {d["text"] for d in train} & {d["text"] for d in valid}
    assert all(len(d["text"]) > 1000 for d in train + valid)
    # Chronological order, 1790 to 2021; about 5% held out for validation.
    assert train_ids == sorted(train_ids)
    assert train_ids[0].startswith("1790_") and train_ids[-1].startswith("2021_")
    assert 0.04 < len(valid) / 233 < 0.06
    assert valid[-1]["text"].startswith("Mr. Speaker, Mr. Vice President, Members of Congress")
    assert 9.5e6 < sum(len(d["text"]) for d in train) < 11e6


def test_heldout_is_moby_dick_chapters(corpus_paths) -> None:
    docs = _docs(corpus_paths.heldout)
    assert len(docs) == 136  # 135 chapters + epilogue
    assert [d["id"] for d in docs] == [f"chapter_{i}" for i in range(1, 136)] + ["epilogue"]
    assert docs[0]["text"].startswith("CHAPTER 1. Loomings.\n\nCall me Ishmael.")
    assert docs[134]["text"].startswith("CHAPTER 135. The Chase.—Third Day.")
    assert docs[-1]["text"].startswith("Epilogue")
    assert "Ishmael" not in "".join(d["text"] for d in _docs(corpus_paths.train))
    assert 1.1e6 < sum(len(d["text"]) for d in docs) < 1.3e6


def test_manifest_matches_files(corpus_paths) -> None:
    man = json.loads(corpus_paths.manifest.read_text())
    for key in ("train", "valid", "heldout"):
        path = getattr(corpus_paths, key)
        assert man["files"][key]["sha256"] == sha256_file(path)
        assert man["files"][key]["documents"] == len(_docs(path))
    assert man["valid_addresses"] == list(VALID_ADDRESSES)


def test_deterministic_and_idempotent(corpus_paths, corpus_tarballs, tmp_path: Path,
                                      monkeypatch) -> None:
    paths = prepare_corpus(tmp_path, sotu_tarball=corpus_tarballs["sotu"],
                           moby_tarball=corpus_tarballs["moby"])
    for key in ("train", "valid", "heldout"):  # same bytes as the cached corpus
        assert getattr(paths, key).read_bytes() == getattr(corpus_paths, key).read_bytes()
    mtimes = [p.stat().st_mtime_ns for p in (paths.train, paths.valid, paths.heldout)]

    # A second run needs neither npm nor the tarballs, and rewrites nothing.
    monkeypatch.setattr(corpus_mod.shutil, "which", lambda _name: None)
    again = prepare_corpus(tmp_path)
    assert again == paths
    assert [p.stat().st_mtime_ns for p in (paths.train, paths.valid, paths.heldout)] == mtimes

    # A damaged output invalidates the cache: without npm that is now a clear error...
    paths.valid.write_text("truncated\n")
    with pytest.raises(NpmNotFoundError, match="npm.*--sotu-tarball"):
        prepare_corpus(tmp_path)
    # ...and with the tarballs it is rebuilt.
    prepare_corpus(tmp_path, sotu_tarball=corpus_tarballs["sotu"],
                   moby_tarball=corpus_tarballs["moby"])
    assert paths.valid.read_bytes() == corpus_paths.valid.read_bytes()


def test_sha_mismatch_detected(corpus_tarballs, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "sotu.tgz"
    data = bytearray(corpus_tarballs["sotu"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(CorpusChecksumError, match=EXPECTED_SHA256[SOTU_PACKAGE]) as info:
        prepare_corpus(tmp_path / "cache", sotu_tarball=bad, moby_tarball=corpus_tarballs["moby"])
    assert str(bad) in str(info.value)
    assert not (tmp_path / "cache" / "corpus" / "manifest.json").exists()
    # The CLI reports the same as one line and exit status 2.
    rc = prepare_cli.main(["--cache-dir", str(tmp_path / "cache"), "--sotu-tarball", str(bad),
                           "--moby-tarball", str(corpus_tarballs["moby"])])
    err = capsys.readouterr().err
    assert rc == 2 and "SHA-256 mismatch for SOTU tarball" in err and "Traceback" not in err


def test_missing_tarball_and_missing_npm(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="SOTU tarball not found: .*nope.tgz"):
        prepare_corpus(tmp_path, sotu_tarball=tmp_path / "nope.tgz")
    monkeypatch.setattr(corpus_mod.shutil, "which", lambda _name: None)
    with pytest.raises(NpmNotFoundError, match=r"`npm` is not on PATH.*install.*--sotu-tarball"):
        prepare_corpus(tmp_path / "empty-cache")


def test_wrong_layout_rejected(tmp_path: Path) -> None:
    tgz = tmp_path / "fake.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        body = b"Fellow-Citizens"
        info = tarfile.TarInfo("package/data/1790_george_washington_n.txt")
        info.size = len(body)
        tf.addfile(info, io.BytesIO(body))
    with pytest.raises(CorpusError, match="expected 233 .* found 1"):
        read_sotu(tgz)
    notgz = tmp_path / "plain.tgz"
    notgz.write_bytes(b"not a gzip file")
    with pytest.raises(CorpusError, match="not a readable .tgz"):
        read_sotu(notgz)


def test_cli_prints_paths(corpus_paths, mlc_cache_dir: Path, capsys) -> None:
    assert prepare_cli.main(["--cache-dir", str(mlc_cache_dir), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == corpus_paths.as_dict()
    assert prepare_cli.main(["--cache-dir", str(mlc_cache_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{k}: {getattr(corpus_paths, k)}" for k in ("train", "valid", "heldout")]


def test_corpus_tarball_copy_is_accepted(corpus_tarballs, corpus_paths, tmp_path: Path) -> None:
    # A local tarball with the right SHA is used as is (no npm), wherever it lives.
    local = tmp_path / "elsewhere" / "any-name.tgz"
    local.parent.mkdir()
    shutil.copy(corpus_tarballs["moby"], local)
    paths = prepare_corpus(tmp_path / "c", sotu_tarball=corpus_tarballs["sotu"],
                           moby_tarball=local)
    assert paths.heldout.read_bytes() == corpus_paths.heldout.read_bytes()
