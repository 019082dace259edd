"""Generate text from a checkpoint with the latent loop per new token (any method).

    python tools/generate.py runs/tiny --prompt "The state of the Union" --max-new-tokens 60
    python tools/generate.py runs/tiny_adaptive --prompt-file prompts.txt --temperature 0.8 \\
        --top-p 0.95 --seed 1 --json out.json

Prints each continuation, then tokens/s, mean passes (token pass + latent steps) per generated
token and inference FLOPs per token. A checkpoint saved with any TP/PP/DP layout, or a latent
export, loads on one process (``--device cuda`` for a GPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_latentcot.training.faults import exits_on_input_error


@exits_on_input_error  # a missing run directory, a truncated checkpoint: one line, exit 2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate with the latent loop per token")
    p.add_argument("checkpoint", help="run directory, iter_* directory or latent export")
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--prompt-file", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--no-eod-prefix", action="store_true",
                   help="do not start prompts with EOD (the training stream's document start)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--json", default=None, help="write prompts, outputs and stats here")
    args = p.parse_args(argv)

    from megatron_latentcot.inference.generate import SamplingConfig, generate_text
    from megatron_latentcot.inference.loading import load_model, parse_dtype

    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [ln for ln in Path(args.prompt_file).read_text().splitlines() if ln.strip()]
    if not prompts:
        prompts = [""]  # unconditional: from the document start
    model = load_model(args.checkpoint, device=args.device, dtype=parse_dtype(args.dtype),
                       tokenizer_model=args.tokenizer_model)
    model.require_tokenizer()
    sampling = SamplingConfig(args.temperature, args.top_p, args.top_k, args.seed)
    outputs, records, totals = [], [], {"tokens": 0, "steps": 0, "seconds": 0.0, "flops": 0.0}
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        texts, res = generate_text(model, batch, args.max_new_tokens, sampling,
                                   prepend_eod=not args.no_eod_prefix, stop_strings=args.stop)
        stats = res.stats()
        for prompt, text, steps, reason in zip(batch, texts, res.steps, res.finish_reasons):
            outputs.append(text)
            records.append({"prompt": prompt, "output": text, "steps": steps,
                            "finish_reason": reason})
            print(f"=== {prompt!r}\n{prompt}{text}\n[{len(steps)} tokens, {reason}, mean "
                  f"{sum(steps) / max(len(steps), 1):.2f} passes/token]")
        totals["tokens"] += res.generated_tokens
        totals["steps"] += sum(map(sum, res.steps))
        totals["seconds"] += res.prefill_seconds + res.decode_seconds
        totals["flops"] += stats["flops_per_token"] * res.generated_tokens
    n = max(totals["tokens"], 1)
    summary = {"method": model.method, "generated_tokens": totals["tokens"],
               "tokens_per_s": totals["tokens"] / totals["seconds"] if totals["seconds"] else 0.0,
               "mean_latent_steps": totals["steps"] / n, "flops_per_token": totals["flops"] / n}
    print(f"--- {model.method}: {summary['generated_tokens']} tokens, "
          f"{summary['tokens_per_s']:.1f} tokens/s, {summary['mean_latent_steps']:.2f} passes/token, "
          f"{summary['flops_per_token']:.3e} FLOPs/token")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "generations": records,
                                               "sampling": vars(sampling)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
