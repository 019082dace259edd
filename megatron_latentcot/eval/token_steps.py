"""Per-token latent steps and losses of a text: the data behind tools/plot_latent_steps.py.

Token j of the text is emitted after the model's latent steps at position j-1 (the first one
after the EOD that starts the document): its *steps* are those passes (token pass included) and
its *loss* is ``-log p(token j | tokens < j)``, both from one teacher-forced training forward,
which equals step-by-step decoding (tests/test_generate.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from megatron_latentcot.inference.decoder import training_forward


@dataclass
class TokenSteps:
    ids: list[int]
    pieces: list[str]  # each token's text (pieces concatenate to the decoded text)
    steps: list[int]  # passes run to emit the token
    loss: list[float]  # nats
    max_steps: int
    method: str

    def to_dict(self) -> dict:
        return asdict(self)

    def histogram(self) -> list[int]:
        """Tokens that took 1, 2, ..., max_steps passes."""
        counts = [0] * self.max_steps
        for s in self.steps:
            counts[s - 1] += 1
        return counts

    def mean_loss_by_steps(self) -> list[float | None]:
        sums, counts = [0.0] * self.max_steps, [0] * self.max_steps
        for s, loss in zip(self.steps, self.loss):
            sums[s - 1] += loss
            counts[s - 1] += 1
        return [s / c if c else None for s, c in zip(sums, counts)]


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Text of each token such that the pieces concatenate to ``decode(ids)`` where possible."""
    pieces, prev = [], ""
    for j in range(len(ids)):
        text = tokenizer.decode(ids[:j + 1])
        if text.startswith(prev):
            pieces.append(text[len(prev):])
        else:  # a multi-byte character split across tokens, or a normalising decoder
            pieces.append(tokenizer.decode([ids[j]]))
        prev = text
    return pieces


@torch.no_grad()
def token_steps(model, text: str, max_tokens: int | None = None) -> TokenSteps:
    """Steps and loss of every token of ``text`` (its first ``max_tokens`` tokens)."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer; pass tokenizer_model when loading it")
    ids = tok.encode(text)[:max_tokens] if max_tokens else tok.encode(text)
    if not ids:
        raise ValueError("the text has no tokens")
    seq = torch.tensor([[tok.eod, *ids[:-1]]], device=model.device)
    tf = training_forward(model.scheduler, seq)
    loss = torch.nn.functional.cross_entropy(tf.logits[0].double(),
                                             torch.tensor(ids, device=model.device),
                                             reduction="none")
    lat = model.cfg.latent
    max_steps = 1 if lat.method == "vanilla" else lat.max_steps
    return TokenSteps(ids, token_pieces(tok, ids), tf.steps[0].tolist(), loss.tolist(),
                      max_steps, lat.method)
