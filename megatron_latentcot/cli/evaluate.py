"""Evaluate a checkpoint: perplexity (token and per byte) and LAMBADA-style accuracy.

    python tools/evaluate.py runs/tiny                         # the config's valid + held-out data
    python tools/evaluate.py runs/tiny --jsonl valid=corpus/valid.jsonl \\
        --data heldout=data_cache/moby_heldout_text_document --lambada tests/fixtures/lambada_sotu.jsonl \\
        --output-dir runs/tiny/eval

Writes ``results.json`` and ``results.md`` (a Markdown table) to ``--output-dir`` (default: an
``eval`` directory beside the checkpoint) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from megatron_latentcot.training.faults import exits_on_input_error


def _named(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    return (name, path) if sep else (Path(spec).name.removesuffix("_text_document"), spec)


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def markdown_table(results: dict[str, Any]) -> str:
    lines = []
    m = results["model"]
    lines.append(f"Model: `{m['path']}` ({m['method']}, iteration {m.get('iteration')})\n")
    if results.get("perplexity"):
        lines += ["| data | docs | tokens | loss | token ppl | byte ppl | bits/byte | word ppl "
                  "| mean steps |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in results["perplexity"].items():
            lines.append(f"| {name} | {r['docs']} | {r['tokens']} | {_fmt(r['loss'])} | "
                         f"{_fmt(r['token_perplexity'], 2)} | {_fmt(r['byte_perplexity'])} | "
                         f"{_fmt(r['bits_per_byte'])} | {_fmt(r['word_perplexity'], 2)} | "
                         f"{_fmt(r['mean_steps'], 2)} |")
        lines.append("")
    if results.get("lambada"):
        lines += ["| LAMBADA-style data | examples | accuracy | target ppl | mean steps |",
                  "|---|---:|---:|---:|---:|"]
        for name, r in results["lambada"].items():
            lines.append(f"| {name} | {r['examples']} | {_fmt(r['accuracy'])} | "
                         f"{_fmt(r['perplexity'], 2)} | {_fmt(r['mean_steps'], 2)} |")
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from megatron_latentcot.data.corpus import read_jsonl_texts
    from megatron_latentcot.eval.lambada import evaluate_lambada
    from megatron_latentcot.eval.perplexity import (
        documents_from_indexed,
        documents_from_jsonl,
        evaluate_perplexity,
        truncate_documents,
    )
    from megatron_latentcot.inference.loading import load_model, parse_dtype

    model = load_model(args.checkpoint, device=args.device, dtype=parse_dtype(args.dtype),
                       tokenizer_model=args.tokenizer_model)
    tok = model.require_tokenizer()
    data = [_named(s) for s in args.data]
    jsonl = [_named(s) for s in args.jsonl]
    if not data and not jsonl and not args.no_default_data:  # the config's evaluation data
        d = model.cfg.data
        data = [(n, p) for n, p in (("valid", d.valid_path), ("heldout", d.heldout_path)) if p]
    window = args.window or model.cfg.data.seq_length
    results: dict[str, Any] = {
        "model": {"path": str(args.checkpoint), "method": model.method,
                  "max_steps": model.cfg.latent.max_steps, "tau": model.cfg.latent.tau,
                  **{k: model.source.get(k) for k in ("iteration", "consumed_tokens")}},
        "settings": {"window": window, "stride": args.stride or max(1, window // 2),
                     "max_docs": args.max_docs, "max_tokens": args.max_tokens,
                     "dtype": args.dtype, "device": args.device},
        "perplexity": {}, "lambada": {}}
    sources = [(n, "indexed", p) for n, p in data] + [(n, "jsonl", p) for n, p in jsonl]
    for name, kind, path in sources:
        t0 = time.perf_counter()
        docs = (documents_from_indexed(path, tok, args.max_docs) if kind == "indexed"
                else documents_from_jsonl(path, tok, args.key, args.max_docs))
        docs = truncate_documents(docs, args.max_tokens, tok)
        r = evaluate_perplexity(model, docs, tok.eod, window, args.stride, args.batch_size)
        results["perplexity"][name] = dict(r.to_dict(), path=str(path),
                                           seconds=time.perf_counter() - t0)
    for spec in args.lambada:
        name, path = _named(spec)
        texts = read_jsonl_texts(path, args.key)[:args.max_docs or None]
        r = evaluate_lambada(model, texts, tok, args.batch_size)
        results["lambada"][name.removesuffix(".jsonl")] = dict(r.to_dict(), path=str(path))
    return results


@exits_on_input_error  # a missing run directory, a corrupt .idx: one line, exit 2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Perplexity and LAMBADA-style accuracy of a checkpoint")
    p.add_argument("checkpoint", help="run directory, iter_* directory or latent export")
    p.add_argument("--data", action="append", default=[],
                   help="[name=]prefix of an indexed dataset (repeatable)")
    p.add_argument("--jsonl", action="append", default=[],
                   help="[name=]path of a JSONL of documents (repeatable)")
    p.add_argument("--lambada", action="append", default=[],
                   help="[name=]path of a JSONL of passages (repeatable)")
    p.add_argument("--no-default-data", action="store_true",
                   help="without --data/--jsonl, skip the config's valid/held-out datasets")
    p.add_argument("--key", default="text", help="JSON field holding the text")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: "
                   "the training sequence length)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: window / 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="per dataset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--output-dir", default=None)
    args = p.parse_args(argv)
    results = run(args)
    table = markdown_table(results)
    out = Path(args.output_dir) if args.output_dir else Path(args.checkpoint) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
