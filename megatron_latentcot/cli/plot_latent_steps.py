"""Where the model thinks: every token of a text coloured by the latent steps it took.

    python tools/plot_latent_steps.py runs/tiny_adaptive --text-file passage.txt --output-dir fig
    python tools/plot_latent_steps.py runs/tiny_adaptive --jsonl corpus/valid.jsonl --doc 3

Writes to ``--output-dir``: ``latent_steps.html`` (tokens on a background by steps, hover for
steps / loss), ``latent_steps_tokens.png`` (the same as an image), ``latent_steps_hist.png``
(tokens per step count), ``latent_steps_vs_loss.png`` (steps against the token's loss, with the
mean loss per step count) and ``latent_steps.json`` (the numbers). A token's steps are the
passes the model ran before emitting it (at the previous position); its loss is the
cross-entropy of emitting it (see megatron_latentcot/eval/token_steps.py).
"""

from __future__ import annotations

import argparse
import html
import json
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_latentcot.eval.token_steps import TokenSteps

CMAP = "viridis"


def step_colors(max_steps: int) -> list[str]:
    """One hex colour per step count 1..max_steps (light for few, dark for many)."""
    import matplotlib

    cmap = matplotlib.colormaps[CMAP]
    n = max(max_steps, 2)
    return [matplotlib.colors.to_hex(cmap(1.0 - 0.85 * (s - 1) / (n - 1)))
            for s in range(1, max_steps + 1)]


def _text_color(hex_color: str) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def render_html(ts: TokenSteps, title: str) -> str:
    colors = step_colors(ts.max_steps)
    spans = []
    for piece, s, loss in zip(ts.pieces, ts.steps, ts.loss):
        c = colors[s - 1]
        text = html.escape(piece).replace("\n", "<br>\n")
        spans.append(f'<span class="t" style="background:{c};color:{_text_color(c)}" '
                     f'title="steps {s} | loss {loss:.2f}">{text}</span>')
    legend = " ".join(f'<span class="t" style="background:{c};color:{_text_color(c)}">'
                      f"{k} step{'s' if k > 1 else ''}</span>"
                      for k, c in enumerate(colors, 1))
    hist = ts.histogram()
    mean = sum(ts.steps) / len(ts.steps)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: Georgia, serif; max-width: 58em; margin: 2em auto; line-height: 1.9; }}
.t {{ padding: 0.1em 0; border-radius: 2px; white-space: pre-wrap; }}
.legend {{ font-family: sans-serif; font-size: 0.9em; margin-bottom: 1.5em; }}
</style></head><body>
<h3>{html.escape(title)}</h3>
<div class="legend">{legend}<br>method {html.escape(ts.method)} &middot; {len(ts.ids)} tokens
&middot; mean {mean:.2f} steps/token &middot; tokens per step count {hist}</div>
<div>{''.join(spans)}</div>
</body></html>
"""


def plot_tokens_png(ts: TokenSteps, path: Path, title: str, width_chars: int = 110) -> None:
    """Tokens laid out in a monospace grid, each on its step colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    colors = step_colors(ts.max_steps)
    cells = []  # (line, column, text, colour)
    line = col = 0
    for piece, s in zip(ts.pieces, ts.steps):
        parts = piece.split("\n")
        for i, part in enumerate(parts):
            if i > 0:
                line, col = line + 1, 0
            part = part.replace("\t", " ")
            if col + len(part) > width_chars and col > 0:
                line, col = line + 1, 0
            if part:
                cells.append((line, col, part, colors[s - 1]))
                col += len(part)
    lines = line + 1
    fontsize = 9.5
    char_in = 0.6021 * fontsize / 72  # DejaVu Sans Mono advance width: 0.6021 em
    line_in, head_in = 1.55 * fontsize / 72, 0.75
    fig_w, body_h = width_chars * char_in, lines * line_in
    fig = plt.figure(figsize=(fig_w, body_h + head_in))
    ax = fig.add_axes((0.0, 0.0, 1.0, body_h / (body_h + head_in)))  # 1 x unit = 1 character
    ax.set_xlim(0, width_chars)
    ax.set_ylim(lines, 0)
    ax.axis("off")
    for ln, c, text, color in cells:
        ax.add_patch(Rectangle((c, ln + 0.06), len(text), 0.88, facecolor=color,
                               edgecolor="none"))
        ax.text(c, ln + 0.5, text, family="DejaVu Sans Mono", fontsize=fontsize, va="center",
                ha="left", color=_text_color(color))
    handles = [Patch(color=c, label=f"{k} step{'s' if k > 1 else ''}")
               for k, c in enumerate(colors, 1)]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1.0 - 0.3 / (
        body_h + head_in)), ncol=len(handles), frameon=False, fontsize=9)
    fig.suptitle(title, fontsize=10, y=1.0 - 0.05 / (body_h + head_in), va="top")
    fig.savefig(path, dpi=130, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def plot_histogram(ts: TokenSteps, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = ts.histogram()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.bar(range(1, ts.max_steps + 1), hist, color=step_colors(ts.max_steps), edgecolor="k")
    ax.set_xticks(range(1, ts.max_steps + 1))
    ax.set_xlabel("passes per token (token pass + latent steps)")
    ax.set_ylabel("tokens")
    ax.set_title(textwrap.fill(title, 60), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_steps_vs_loss(ts: TokenSteps, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = np.array(ts.steps, dtype=float)
    rng = np.random.default_rng(0)
    jitter = steps + rng.uniform(-0.18, 0.18, size=steps.shape)
    colors = step_colors(ts.max_steps)
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    ax.scatter(jitter, ts.loss, s=7, alpha=0.5, c=[colors[int(s) - 1] for s in steps],
               edgecolors="none")
    means = ts.mean_loss_by_steps()
    xs = [k for k, m in enumerate(means, 1) if m is not None]
    ax.plot(xs, [means[k - 1] for k in xs], "k-o", ms=4, label="mean loss")
    ax.set_xticks(range(1, ts.max_steps + 1))
    ax.set_xlabel("passes per token")
    ax.set_ylabel("token loss (nats)")
    ax.legend(fontsize=8)
    ax.set_title(textwrap.fill(title, 60), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_all(ts: TokenSteps, out: Path, title: str) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"html": out / "latent_steps.html", "tokens": out / "latent_steps_tokens.png",
             "hist": out / "latent_steps_hist.png", "scatter": out / "latent_steps_vs_loss.png",
             "json": out / "latent_steps.json"}
    files["html"].write_text(render_html(ts, title), encoding="utf-8")
    plot_tokens_png(ts, files["tokens"], title)
    plot_histogram(ts, files["hist"], title)
    plot_steps_vs_loss(ts, files["scatter"], title)
    summary = {"title": title, "tokens": len(ts.ids), "mean_steps": sum(ts.steps) / len(ts.steps),
               "histogram": ts.histogram(), "mean_loss_by_steps": ts.mean_loss_by_steps(),
               **ts.to_dict()}
    files["json"].write_text(json.dumps(summary, indent=1) + "\n")
    return {k: str(v) for k, v in files.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Colour every token by the latent steps it took")
    p.add_argument("checkpoint", help="run directory, iter_* directory or latent export")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--text-file")
    src.add_argument("--jsonl", help="a JSONL of documents (with --doc)")
    p.add_argument("--doc", type=int, default=0, help="document index in --jsonl")
    p.add_argument("--key", default="text")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="default: the training sequence length")
    p.add_argument("--title", default=None)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer-model", default=None)
    args = p.parse_args(argv)

    from megatron_latentcot.eval.token_steps import token_steps
    from megatron_latentcot.inference.loading import load_model

    if args.text is not None:
        text = args.text
    elif args.text_file:
        text = Path(args.text_file).read_text(encoding="utf-8")
    else:
        from megatron_latentcot.data.corpus import read_jsonl_texts

        text = read_jsonl_texts(args.jsonl, args.key)[args.doc]
    model = load_model(args.checkpoint, device=args.device, tokenizer_model=args.tokenizer_model)
    ts = token_steps(model, text, args.max_tokens or model.cfg.data.seq_length)
    title = args.title or (f"{model.method} (K_max {ts.max_steps}, tau {model.cfg.latent.tau}) "
                           f"from {args.checkpoint}")
    files = write_all(ts, Path(args.output_dir), title)
    print(f"{len(ts.ids)} tokens, mean {sum(ts.steps) / len(ts.steps):.2f} passes/token, "
          f"histogram {ts.histogram()}")
    for f in files.values():
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
