"""The latent-step scheduler: token-level adaptive latent CoT on one pipeline stage.

Step 1 is the ordinary token pass over all ``B*T`` slots. Step k+1 runs only the tokens still
active, **compacted** into a dense packed tensor, with ``z^(k)`` (the final-norm output) as
their whole input and the same RoPE position t. Every layer keeps the K/V of every executed
(t, k) slot; a query (t_i, k_i) sees key (t_j, k_j) iff same row, t_j <= t_i and k_j <= k_i
(the cache holds only steps <= k_i), and the same document when documents are masked. Pruned
tokens' executed K/V stay visible. ``z^f`` mixes each token's states by their exit
probabilities; one LM head call on ``z^f`` gives the LM loss. See ../shared/METHOD.md.

Methods: ``vanilla`` (K = 1), ``latent_fixed`` (every token K steps, z^f = z^(K)) and
``adaptive`` (Router + pruning + correctness-aware loss) share this one loop.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field

import torch

from megatron_latentcot.config import METHODS, Config, ConfigError, check_layout
from megatron_latentcot.flops import latent_train_flops
from megatron_latentcot.loss import masked_mean, token_cross_entropy
from megatron_latentcot.model import baselines
from megatron_latentcot.model.attention import AttentionPlan, causal_plan, latent_plan, visible_pairs
from megatron_latentcot.model.llama import LayerRun, LlamaStage, upcast
from megatron_latentcot.model.router import Decision, decide


@dataclass
class StepRecord:
    """What one latent step ran: for metrics and exact FLOPs."""

    tokens: int  # token slots computed at this step, less sequence parallelism's padding
    live: int  # of which really executed (== tokens when compacting)
    pairs: int  # visible attention pairs
    gates: torch.Tensor | None = None  # the live tokens' gates (detached)


@dataclass
class LatentOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    adaptive_loss: torch.Tensor
    steps: torch.Tensor  # [B*T] last executed step of each token
    records: list[StepRecord] = field(default_factory=list)
    ptarget_tokens: int = 0  # tokens that went through the per-step p_target head
    head_tokens: int | None = None  # LM-head-sized matmuls with gradient (None = one per token)


class LatentStepScheduler:
    def __init__(self, stage: LlamaStage, cfg: Config):
        self.stage, self.cfg = stage, cfg
        lat = cfg.latent
        if lat.method not in METHODS:
            raise ConfigError(f"latent.method: expected one of {METHODS}, got {lat.method!r}")
        check_layout(cfg)  # config.py's table, also for configs built without validate()
        self.max_steps = 1 if lat.method == "vanilla" else lat.max_steps
        self.tp_size = cfg.parallel.tensor_model_parallel_size
        from megatron.core import parallel_state

        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()

    # -- pipeline-stage interface ------------------------------------------------------------
    def stage_forward(self, mb: dict, x: torch.Tensor | None):
        """One stage's pass of micro-batch ``mb`` in the one-pass (GPipe) schedule: a middle
        stage of a K = 1 model, or the whole model; returns (output or loss, stats)."""
        if not self.stage.post_process:
            return self._token_pass(mb, x)[0], {}
        out = self.forward(mb, x)
        return out.loss, self.stats(out, mb)

    def _token_pass(self, mb: dict, x: torch.Tensor | None):
        stage, tokens = self.stage, mb["tokens"]
        rows, seq = tokens.shape
        positions = torch.arange(seq, device=tokens.device).repeat(rows)
        plan = causal_plan(rows, seq, mb.get("doc_ids"), stage.attention_backend)
        h = stage.embed(tokens.reshape(-1)) if stage.pre_process else x
        h, kv = stage.run_layers(h, positions, plan)
        return h, kv, plan

    @property
    def cache_across_steps(self) -> bool:
        """Later steps attend to earlier steps' K/V (the latent loop), or not (looped)."""
        return self.cfg.latent.method in ("latent_fixed", "adaptive")

    def step_plan(self, mb: dict, q_slots: torch.Tensor, key_slots: torch.Tensor | None,
                  key_live: torch.Tensor | None = None) -> AttentionPlan:
        """The attention plan of one layer run: causal over all slots, or the latent 2-D rule
        for queries ``q_slots`` over the cache ``key_slots`` (None = the token pass)."""
        rows, seq = mb["tokens"].shape
        doc = mb.get("doc_ids")
        if key_slots is None:
            return causal_plan(rows, seq, doc, self.stage.attention_backend)
        return latent_plan(q_slots, key_slots, key_live, rows, seq,
                           None if doc is None else doc.reshape(-1), self.stage.attention_backend)

    def forward(self, mb: dict, x: torch.Tensor | None = None) -> LatentOutput:
        """Every step on this stage's layers (the whole model, or the last stage of K = 1)."""
        method = self.cfg.latent.method
        if method in ("pondering", "pause") and self.max_steps > 1:
            return self._baseline(mb)
        steps = self.steps(mb)
        request, cache = next(steps), None
        while True:
            inp = request.x
            if inp is None:  # the token pass: embed here, or what the previous stage sent
                inp = self.stage.embed(mb["tokens"].reshape(-1)) if self.stage.pre_process else x
            h, kv = self.stage.run_layers(inp, request.positions, request.plan,
                                          past=cache if request.past else None)
            cache = kv
            try:
                request = steps.send(h)
            except StopIteration as done:
                return done.value

    def steps(self, mb: dict) -> Generator[LayerRun, torch.Tensor, LatentOutput]:
        """The method as a sequence of layer runs: yields what to run through the layers,
        receives the layers' output, returns the losses. Any driver (one stage, or the pipeline
        across stages in ``training/latent_pipeline.py``) runs the same steps."""
        if self.cfg.latent.method == "looped" and self.max_steps > 1:
            return (yield from self._looped_steps(mb))
        return (yield from self._latent_steps(mb))

    # -- the latent loop -------------------------------------------------------------------
    def _latent_steps(self, mb: dict) -> Generator[LayerRun, torch.Tensor, LatentOutput]:
        stage, lat = self.stage, self.cfg.latent
        tokens = mb["tokens"]
        rows, seq = tokens.shape
        n, device = rows * seq, tokens.device
        labels = mb["labels"].reshape(-1)
        loss_mask = mb["loss_mask"].reshape(-1)
        positions = torch.arange(seq, device=device).repeat(rows)
        all_slots = torch.arange(n, device=device)

        plan = self.step_plan(mb, all_slots, None)
        h = yield LayerRun(None, all_slots, positions, plan, past=False)
        if self.max_steps == 1:  # the token pass alone (z^f = z^(1)); token-sharded under SP
            lm_loss = masked_mean(token_cross_entropy(stage.logits(stage.final_norm(h)), labels),
                                  loss_mask)
            return LatentOutput(loss=lm_loss, lm_loss=lm_loss, adaptive_loss=torch.zeros_like(lm_loss),
                                steps=torch.ones(n, dtype=torch.long, device=device),
                                records=[StepRecord(n, n, visible_pairs(plan))])
        sp = stage.sequence_parallel
        # ``active``: token slot of each row of this rank's h (its shard under SP);
        # ``q_slots``: the step's queries across the TP group (== active without SP);
        # ``live``: which rows really execute (None = all; dead rows are uncompacted halted
        # tokens or SP padding, computed but never visible nor mixed); ``q_real``: how many
        # of q_slots are not SP padding (padding is no model work: one process has none).
        active = all_slots.chunk(self.tp_size)[self.tp_rank] if sp else all_slots
        q_slots, live, q_real = all_slots, None, n
        key_slots, key_live = all_slots, None
        work = upcast(h).dtype  # routing and mixing precision: float32 (float64 in tests)
        reach = torch.ones(active.numel(), device=device, dtype=work)
        z_final = torch.zeros(n, 1, h.shape[-1], device=device, dtype=work)
        steps = torch.ones(n, dtype=torch.long, device=device)
        adaptive_sum = torch.zeros((), device=device, dtype=work)
        records, ptarget_tokens = [], 0
        for k in range(1, self.max_steps + 1):
            z = stage.final_norm(h)
            decision, gate = self._decide(z, reach, k)
            if live is not None:  # dead rows neither exit nor continue
                decision = Decision(decision.exit * live, decision.reach_next,
                                    decision.cont & live)
            if gate is not None:
                gate = (gate if live is None else gate[live]).detach()
            n_live = self._tp_sum(active.numel() if live is None else int(live.sum()))
            real_plan = plan if q_real == q_slots.numel() else self.step_plan(
                mb, q_slots[:q_real], key_slots, key_live)
            records.append(StepRecord(tokens=q_real, live=n_live,
                                      pairs=visible_pairs(real_plan), gates=gate))
            z_final = z_final.index_add(0, active, decision.exit[:, None, None] * upcast(z))
            cont = decision.cont
            if self._tp_sum(int(cont.sum())) == 0:  # every rank agrees: nobody goes on
                break
            steps[active[cont]] = k + 1
            new_live = None
            if not lat.compact:
                live, reach, h_in = cont, decision.reach_next, z
                new_live = live
            elif sp:
                active, reach, h_in, live, q_slots, new_live = self._regather(
                    active[cont], decision.reach_next[cont], z[cont])
                q_real = int(new_live.sum())  # the padding is at the end
            else:
                active, reach, h_in = active[cont], decision.reach_next[cont], z[cont]
                q_slots, q_real = active, active.numel()
            if new_live is not None or key_live is not None:
                old = key_live if key_live is not None else torch.ones_like(key_slots, dtype=torch.bool)
                new = new_live if new_live is not None else torch.ones_like(q_slots, dtype=torch.bool)
                key_live = torch.cat([old, new])
            key_slots = torch.cat([key_slots, q_slots])
            if lat.method == "adaptive" and lat.adaptive_loss_weight > 0:
                # sg(p_target^(k)) of the survivors: z^(k) is exactly their next input
                with torch.no_grad():
                    p_target = torch.exp(-token_cross_entropy(stage.logits(h_in), labels[q_slots]))
                    if sp:
                        p_target = p_target.chunk(self.tp_size)[self.tp_rank]
                ptarget_tokens += q_real
                term = loss_mask[active] * p_target.pow(lat.adaptive_loss_beta) * reach
                adaptive_sum = adaptive_sum + (term if live is None else term * live).sum()
            plan = self.step_plan(mb, q_slots, key_slots, key_live)
            h = yield LayerRun(h_in.to(h.dtype), q_slots, positions[q_slots], plan, past=True)

        if sp:  # each rank mixed the tokens it ran: sum, then back to this rank's shard
            from megatron.core.tensor_parallel import (
                reduce_from_tensor_model_parallel_region,
                scatter_to_sequence_parallel_region,
            )

            z_final = scatter_to_sequence_parallel_region(
                reduce_from_tensor_model_parallel_region(z_final))
            adaptive_sum = reduce_from_tensor_model_parallel_region(adaptive_sum)
            torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX,
                                         group=self._tp_group())
        logits = stage.logits(z_final.to(h.dtype))
        lm_loss = masked_mean(token_cross_entropy(logits, labels), loss_mask)
        adaptive_loss = adaptive_sum / loss_mask.sum().clamp(min=1.0)
        loss = lm_loss + lat.adaptive_loss_weight * adaptive_loss if lat.method == "adaptive" \
            else lm_loss
        return LatentOutput(loss=loss, lm_loss=lm_loss, adaptive_loss=adaptive_loss,
                            steps=steps, records=records, ptarget_tokens=ptarget_tokens)

    # -- sequence parallelism: rebalance survivors across the TP group ---------------------
    def _tp_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_group()

    def _tp_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group under SP (each rank holds different tokens), else as is."""
        if self.stage.sequence_parallel:
            torch.distributed.all_reduce(t, group=self._tp_group())
        return t

    def _tp_sum(self, value: int) -> int:
        if not self.stage.sequence_parallel:
            return value
        return int(self._tp_reduce(torch.tensor([value], device=self.stage.rotary.inv_freq.device)))

    def _regather(self, slots: torch.Tensor, reach: torch.Tensor, z: torch.Tensor):
        """Survivors of every TP rank -> an even re-split (counts first; the last shard padded).

        Returns this rank's (slots, reach, z, live) and the group's (query slots, live). Padding
        rows repeat the last real slot (keeping queries row-major sorted) and are dead. z and
        reach travel through megatron's differentiable gather, whose backward reduce-scatters.
        """
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        tp, rank, group = self.tp_size, self.tp_rank, self._tp_group()
        counts = torch.zeros(tp, dtype=torch.long, device=slots.device)
        torch.distributed.all_gather_into_tensor(
            counts, torch.tensor([slots.numel()], device=slots.device), group=group)
        counts_l = counts.tolist()
        widest, total = max(counts_l), sum(counts_l)
        chunk = -(-total // tp)

        def gather(t: torch.Tensor, differentiable: bool) -> torch.Tensor:
            padded = torch.cat([t, t.new_zeros((widest - t.shape[0], *t.shape[1:]))])
            if differentiable:
                full = gather_from_sequence_parallel_region(padded.contiguous(), group=group)
            else:
                full = padded.new_empty((widest * tp, *padded.shape[1:]))
                torch.distributed.all_gather_into_tensor(full, padded.contiguous(), group=group)
            parts = [full[r * widest:r * widest + c] for r, c in enumerate(counts_l)]
            real = torch.cat(parts)
            pad = chunk * tp - total
            return torch.cat([real, real.new_zeros((pad, *real.shape[1:]))]), pad

        all_slots, pad = gather(slots, False)
        all_slots[total:] = all_slots[total - 1]
        all_reach, _ = gather(reach, True)
        all_z, _ = gather(z, True)
        all_live = torch.arange(chunk * tp, device=slots.device) < total
        mine = slice(rank * chunk, (rank + 1) * chunk)
        return all_slots[mine], all_reach[mine], all_z[mine], all_live[mine], all_slots, all_live

    def _looped_steps(self, mb: dict) -> Generator[LayerRun, torch.Tensor, LatentOutput]:
        loss, plan = yield from baselines.looped(self.stage, mb, self.max_steps)
        return self._baseline_output(mb, loss, plan)

    def _baseline(self, mb: dict) -> LatentOutput:
        loss, plan = getattr(baselines, self.cfg.latent.method)(self.stage, mb, self.max_steps)
        return self._baseline_output(mb, loss, plan)

    def _baseline_output(self, mb: dict, loss: torch.Tensor, plan: AttentionPlan) -> LatentOutput:
        method, k = self.cfg.latent.method, self.max_steps
        rows, seq = mb["tokens"].shape
        n = rows * seq
        if method == "pause":  # one pass over the K-times longer sequence
            records = [StepRecord(n * k, n, visible_pairs(plan))]  # K slots per real token
        else:
            records = [StepRecord(n, n, visible_pairs(plan))] * k
        # pondering: K-1 extra LM heads and K-1 expected-embedding matmuls, all with gradient
        head_tokens = n * (2 * k - 1) if method == "pondering" else n
        steps = torch.full((n,), k, dtype=torch.long, device=mb["tokens"].device)
        return LatentOutput(loss=loss, lm_loss=loss, adaptive_loss=torch.zeros_like(loss),
                            steps=steps, records=records, head_tokens=head_tokens)

    def _decide(self, z: torch.Tensor, reach: torch.Tensor,
                k: int) -> tuple[Decision, torch.Tensor | None]:
        return decide(reach, z, k, self.max_steps, self.cfg.latent.method,
                      getattr(self.stage, "router", None), self.cfg.latent.tau)

    # -- metrics --------------------------------------------------------------------------
    def stat_names(self) -> list[str]:
        """The keys of :meth:`stats`, known on every rank (all stages reduce them together)."""
        names = ["lm_loss", "tokens", "mean_steps", "flops"]
        if self.cfg.latent.method == "adaptive":
            names += ["adaptive_loss", "gate_mean", "gate_std"]
        return names + [f"active_frac_step{k}" for k in range(1, self.max_steps + 1)]

    def _gate_moments(self, out: LatentOutput) -> tuple[float, float]:
        """Mean and (unbiased) std of every live gate of the micro-batch (0, 0 without any).
        Under SP each TP rank holds its own tokens' gates: count, sum and squared deviations
        are summed over the group, so every rank logs what one process would."""
        gates = [r.gates.double() for r in out.records if r.gates is not None]
        g = torch.cat(gates) if gates else out.steps.new_zeros(0, dtype=torch.float64)
        count, total = self._tp_reduce(torch.stack([g.new_tensor(g.numel()), g.sum()])).tolist()
        if count == 0:
            return 0.0, 0.0
        mean = total / count
        squares = self._tp_reduce((g - mean).pow(2).sum()).item()
        return mean, math.sqrt(squares / (count - 1)) if count > 1 else 0.0

    def stats(self, out: LatentOutput, mb: dict) -> dict[str, float]:
        m = self.cfg.model
        rows, seq = mb["tokens"].shape
        n = rows * seq
        s = {"lm_loss": out.lm_loss.item(), "tokens": float(n),
             "mean_steps": out.steps.float().mean().item()}
        if self.cfg.latent.method == "adaptive":
            s["adaptive_loss"] = out.adaptive_loss.item()
            s["gate_mean"], s["gate_std"] = self._gate_moments(out)
        for k in range(1, self.max_steps + 1):
            live = out.records[k - 1].live if k <= len(out.records) else 0
            s[f"active_frac_step{k}"] = live / n
        vocab = self.stage.vocab_size
        s["flops"] = float(latent_train_flops(
            m, vocab, [r.tokens for r in out.records], [r.pairs for r in out.records],
            head_tokens=out.head_tokens or n, ptarget_tokens=out.ptarget_tokens,
            router_tokens=sum(r.tokens for k, r in enumerate(out.records, start=1)
                              if k < self.max_steps)  # the router runs at every step < K_max
            if self.cfg.latent.method == "adaptive" else 0))
        return s
