"""The latent-step scheduler: token-level adaptive latent CoT on one pipeline stage.

Step 1 is the ordinary token pass over all ``B*T`` slots. Step k+1 runs only the tokens still
active, **compacted** into a dense packed tensor, with ``z^(k)`` (the final-norm output) as
their whole input and the same RoPE position t. Every layer keeps the K/V of every executed
(t, k) slot; a query (t_i, k_i) sees key (t_j, k_j) iff same row, t_j <= t_i and k_j <= k_i
(the cache holds only steps <= k_i), and the same document when documents are masked. Pruned
tokens' executed K/V stay visible. ``z^f`` mixes each token's states by their exit
probabilities; one LM head call on ``z^f`` gives the LM loss. See ../shared/METHOD.md.

Methods: ``vanilla`` (K = 1), ``latent_fixed`` (every token K steps, z^f = z^(K)) and
``adaptive`` (Router + pruning + correctness-aware loss) share this one loop; the baselines'
step generators are in ``baselines.py``. Every method is a step generator (:meth:`steps`) over
a :class:`Feed`: a training micro-batch, or a decoder call's new tokens over the K/V cache of
the rows' earlier positions (:class:`KVStream`, kept by ``inference/decoder.py``). The same
generator serves training (one stage: :meth:`LatentStepScheduler.drive`; the pipeline:
``training/latent_pipeline.py``) and incremental decoding.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field

import torch

from megatron_latentcot.config import METHODS, Config, ConfigError, check_layout
from megatron_latentcot.flops import StepCounts, latent_forward_flops
from megatron_latentcot.loss import masked_mean, token_cross_entropy
from megatron_latentcot.model import baselines, mor
from megatron_latentcot.model.attention import (
    AttentionPlan,
    KVStore,
    causal_plan,
    latent_cache_columns,
    latent_plan,
    visible_pairs,
)
from megatron_latentcot.model.llama import LayerCache, LayerRun, LlamaStage, upcast
from megatron_latentcot.model.router import Decision, decide


@dataclass
class StepRecord:
    """What one latent step ran: for metrics and exact FLOPs."""

    tokens: int  # token slots computed at this step, less sequence parallelism's padding
    live: int  # of which really executed (== tokens when compacting)
    pairs: int  # visible attention pairs
    gates: torch.Tensor | None = None  # the live tokens' gates (detached)
    layers: int | None = None  # layers this run went through (None: all; MoR's runs differ)


@dataclass
class LatentOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    adaptive_loss: torch.Tensor
    steps: torch.Tensor  # [B*T] last executed step of each token
    records: list[StepRecord] = field(default_factory=list)
    ptarget_tokens: int = 0  # tokens that went through the per-step p_target head
    head_tokens: int | None = None  # LM-head-sized matmuls with gradient (None = one per token)
    router_tokens: int | None = None  # 1-output router matmuls (None: adaptive's rule; MoR's own)
    logits: torch.Tensor | None = None  # [N, 1, V/tp] the final logits, when asked for


class KVStream:
    """One chain of layer runs' K/V: a training micro-batch's latent steps, or what a decoder
    keeps across calls (looped: one per repeat; pondering: one per pass; else one). Per layer a
    :class:`~megatron_latentcot.model.attention.KVStore` holds the keys of every executed slot
    in the order they ran, each tagged (row, position, step, live) so that later runs, whose
    grids may be wider, can rebuild the 2-D rule over it. ``capacity``: columns per row to
    preallocate (training: every (t, k) slot the steps can reach; 0: grow as needed)."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.kv: list[LayerCache] | None = None  # written by the driver after each run
        self.rows: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.step: torch.Tensor | None = None
        self.live: torch.Tensor | None = None
        self.max_step, self.masked = 0, False  # known on the host: no device sync to ask

    def keys(self, seq: int, step: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Cached keys as slots of a [rows, seq] grid and which a query of ``step`` sees (None:
        all): executed, and of a step <= ``step``. None when the stream is empty."""
        if self.rows is None:
            return None
        slots = self.rows * seq + self.pos
        if self.max_step <= step and not self.masked:
            return slots, None
        return slots, self.live & (self.step <= step)

    def layer_caches(self, layers: int) -> list[LayerCache]:
        """Each layer's cache for the next run (empty stores the first time)."""
        if self.kv is None:
            self.kv = [(KVStore(self.capacity), None) for _ in range(layers)]
        return self.kv

    def add(self, slots: torch.Tensor, seq: int, step: int, live: torch.Tensor | None) -> None:
        """Tag the keys a run of ``slots`` (of a [rows, seq] grid) at ``step`` appends."""
        self.max_step, self.masked = max(self.max_step, step), self.masked or live is not None
        tags = (slots // seq, slots % seq, torch.full_like(slots, step),
                torch.ones_like(slots, dtype=torch.bool) if live is None else live)
        if self.rows is None:
            self.rows, self.pos, self.step, self.live = tags
        else:
            self.rows, self.pos, self.step, self.live = (
                torch.cat([a, b]) for a, b in zip((self.rows, self.pos, self.step, self.live), tags))


def _cat_live(a: torch.Tensor | None, na: int, b: torch.Tensor | None,
              nb: int) -> torch.Tensor | None:
    """The live mask of keys ``a`` then ``b`` (None = all live) of ``na`` and ``nb`` keys."""
    if a is None and b is None:
        return None
    device = (a if a is not None else b).device
    return torch.cat([torch.ones(na, dtype=torch.bool, device=device) if a is None else a,
                      torch.ones(nb, dtype=torch.bool, device=device) if b is None else b])


def plan_for(rows: int, seq: int, doc: torch.Tensor | None, backend: str, q_slots: torch.Tensor,
             key_slots: torch.Tensor | None, key_live: torch.Tensor | None) -> AttentionPlan:
    """Causal over the whole [rows, seq] grid (``key_slots`` None: a first run of every slot),
    or the 2-D rule for queries ``q_slots`` over the keys ``key_slots`` (in cache order)."""
    if key_slots is None:
        return causal_plan(rows, seq, doc, backend)
    return latent_plan(q_slots, key_slots, key_live, rows, seq,
                       None if doc is None else doc.reshape(-1), backend)


@dataclass
class Feed:
    """The tokens one run of a method's step generator covers.

    Training: every slot of the micro-batch ``mb`` (``streams`` None; the driver embeds). A
    decoder call: the new tokens at ``mb["slots"]`` (sorted) of a ``[rows, width]`` grid
    ``mb["tokens"]``, after the rows' earlier positions, whose K/V ``streams`` hold; the runs
    attend to and extend them. Without ``mb["labels"]`` no loss is computed (and no p_target
    head runs); ``keep_logits`` returns the final logits in :class:`LatentOutput`.
    """

    mb: dict
    streams: list[KVStream] | None = None
    keep_logits: bool = False

    @property
    def decoding(self) -> bool:
        return self.streams is not None

    @property
    def rows(self) -> int:
        return self.mb["tokens"].shape[0]

    @property
    def seq(self) -> int:
        return self.mb["tokens"].shape[1]

    @property
    def labelled(self) -> bool:
        return "labels" in self.mb

    @property
    def slots(self) -> torch.Tensor:
        """Grid slot of every token this run covers (training: all, row-major)."""
        slots = self.mb.get("slots")
        tokens = self.mb["tokens"]
        return torch.arange(tokens.numel(), device=tokens.device) if slots is None else slots

    @property
    def ids(self) -> torch.Tensor:
        flat = self.mb["tokens"].reshape(-1)
        return flat if self.mb.get("slots") is None else flat[self.mb["slots"]]

    def token_input(self, stage: LlamaStage) -> torch.Tensor | None:
        """The first run's input: None in training (the driver, or the previous pipeline stage,
        provides it), the new tokens' embedding when decoding."""
        return stage.embed(self.ids) if self.decoding else None

    def stream(self, i: int, capacity: int = 0) -> KVStream:
        """The decoder's ``i``-th stream, or (training) a fresh one of ``capacity`` columns per
        row (it keeps K/V only for the runs that ask, see :meth:`run`)."""
        return self.streams[i] if self.decoding else KVStream(capacity)

    def keys(self, stream: KVStream, q_slots: torch.Tensor, seq: int, step: int,
             q_live: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The keys (slots, live) a run of ``q_slots`` at ``step`` attends to: the stream's
        visible ones, then its own; (None, None) for a first run over the whole grid (causal)."""
        cached = stream.keys(seq, step)
        if cached is None:
            if q_live is None and q_slots.numel() == self.rows * seq:
                return None, None
            return q_slots, q_live
        slots, live = cached
        return torch.cat([slots, q_slots]), _cat_live(live, slots.numel(), q_live, q_slots.numel())

    def plan(self, stage: LlamaStage, q_slots: torch.Tensor, seq: int, step: int = 1,
             doc: torch.Tensor | None = None) -> AttentionPlan:
        """The plan of a run of ``q_slots`` over stream 0 (causal when nothing is cached)."""
        keys, live = self.keys(self.stream(0), q_slots, seq, step)
        return plan_for(self.rows, seq, doc, stage.attention_backend, q_slots, keys, live)

    def run(self, x: torch.Tensor | None, q_slots: torch.Tensor, seq: int, plan: AttentionPlan,
            stream: KVStream, step: int = 1, live: torch.Tensor | None = None,
            cached: bool = False) -> LayerRun:
        """The request for a run of ``q_slots`` (a [rows, seq] grid's) at ``step``; tags its keys
        in ``stream``. The run attends to and extends ``stream``'s K/V when decoding, and in
        training when ``cached`` (the latent loop: later steps read this one's K/V)."""
        past = stream.rows is not None
        stream.add(q_slots, seq, step, live)
        keep = cached or self.decoding
        return LayerRun(x, q_slots, q_slots % seq, plan, past=keep and past,
                        cache=stream if keep else None)

    def head(self, stage: LlamaStage, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One LM-head call on ``z`` (one row per covered token): the LM loss (0 without labels)
        and the logits when asked for."""
        logits = stage.logits(z)
        if self.labelled:
            labels, loss_mask = self.mb["labels"].reshape(-1), self.mb["loss_mask"].reshape(-1)
            loss = masked_mean(token_cross_entropy(logits, labels), loss_mask)
        else:
            loss = z.new_zeros((), dtype=upcast(z).dtype)
        return loss, logits if self.keep_logits else None


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
        """One stage's pass of micro-batch ``mb`` in a one-pass pipeline schedule: a middle
        stage of a K = 1 model, or the whole model; returns (output or loss, stats)."""
        if not self.stage.post_process:
            return self._token_pass(mb, x), {}
        out = self.forward(mb, x)
        return out.loss, self.stats(out, mb)

    def _token_pass(self, mb: dict, x: torch.Tensor | None) -> torch.Tensor:
        stage, tokens = self.stage, mb["tokens"]
        rows, seq = tokens.shape
        positions = torch.arange(seq, device=tokens.device).repeat(rows)
        plan = causal_plan(rows, seq, mb.get("doc_ids"), stage.attention_backend)
        h = stage.embed(tokens.reshape(-1)) if stage.pre_process else x
        return stage.run_layers(h, positions, plan)[0]

    def cache_columns(self, seq: int) -> int:
        """Columns per row of a training micro-batch's K/V cache (SP padding: :meth:`_regather`)."""
        return latent_cache_columns(self.max_steps, seq, self.stage.attention_backend,
                                    self.tp_size if self.stage.sequence_parallel else 1)

    @property
    def cache_across_steps(self) -> bool:
        """Later steps attend to earlier steps' K/V (the latent loop), or not (looped)."""
        return self.cfg.latent.method in ("latent_fixed", "adaptive")

    def step_plan(self, mb: dict, q_slots: torch.Tensor, key_slots: torch.Tensor | None,
                  key_live: torch.Tensor | None = None) -> AttentionPlan:
        """The attention plan of one layer run: causal over all slots, or the latent 2-D rule
        for queries ``q_slots`` over the cache ``key_slots`` (None = the token pass)."""
        rows, seq = mb["tokens"].shape
        return plan_for(rows, seq, mb.get("doc_ids"), self.stage.attention_backend, q_slots,
                        key_slots, key_live)

    def forward(self, mb: dict, x: torch.Tensor | None = None) -> LatentOutput:
        """Every step on this stage's layers (the whole model, or the last stage of K = 1)."""
        return self.drive(self.steps(mb), mb, x)

    def drive(self, steps: Generator[LayerRun, torch.Tensor, LatentOutput], mb: dict,
              x: torch.Tensor | None = None) -> LatentOutput:
        """Run a step generator to its end on this stage's layers: the one-stage driver of
        training (:meth:`forward`) and of the decoder. A run that names a stream attends to
        and extends its K/V."""
        request = next(steps)
        while True:
            inp = request.x
            if inp is None:  # the token pass: embed here, or what the previous stage sent
                inp = self.stage.embed(mb["tokens"].reshape(-1)) if self.stage.pre_process else x
            stream = request.cache
            layers = len(request.layers or self.stage.layers)
            past = None if stream is None else stream.layer_caches(layers)
            h, caches = self.stage.run_layers(inp, request.positions, request.plan, past=past,
                                              layers=request.layers)
            if stream is not None:
                stream.kv = caches
            try:
                request = steps.send(h)
            except StopIteration as done:
                return done.value

    def steps(self, mb: dict, streams: list[KVStream] | None = None,
              keep_logits: bool = False) -> Generator[LayerRun, torch.Tensor, LatentOutput]:
        """The method as a sequence of layer runs: yields what to run through the layers,
        receives the layers' output, returns the losses. Any driver (one stage, the pipeline
        across stages in ``training/latent_pipeline.py``, the decoder) runs the same steps.

        ``streams`` (decoding, :attr:`streams` of them): the K/V of the rows' earlier
        positions; ``mb`` then holds the new tokens (see :class:`Feed`). ``keep_logits``: return
        the final logits too."""
        feed = Feed(mb, streams, keep_logits)
        method = self.cfg.latent.method
        if method == "mor":  # a step generator of its own (model/mor.py), whatever N_r
            return (yield from mor.mor(self.stage, feed, self.cfg))
        if self.max_steps > 1 and method in ("looped", "pondering", "pause", "ponderlm2"):
            extra = {"jacobi": self.cfg.latent.jacobi_iterations} if method == "ponderlm2" else {}
            out = yield from getattr(baselines, method)(self.stage, feed, self.max_steps, **extra)
            return self._baseline_output(feed, *out)
        return (yield from self._latent_steps(feed))

    @property
    def streams(self) -> int:
        """K/V streams a decoder keeps: one per repeat (looped) or pass (pondering), else one."""
        method = self.cfg.latent.method
        if method == "mor":  # its first layer, one per recursion, its last layer
            return self.cfg.mor.num_recursion + 2
        return self.max_steps if method in ("looped", "pondering") else 1

    @property
    def slots_per_token(self) -> int:
        """Positions one token occupies in the layers' sequence (pause: K, else 1; ponderlm2's
        K stages share the token's position)."""
        return self.max_steps if self.cfg.latent.method == "pause" else 1

    # -- the latent loop -------------------------------------------------------------------
    def _latent_steps(self, feed: Feed) -> Generator[LayerRun, torch.Tensor, LatentOutput]:
        stage, lat, mb = self.stage, self.cfg.latent, feed.mb
        seq, new = feed.seq, feed.slots  # grid slot of each token ("index") this run covers
        n, device = new.numel(), new.device
        labels = mb["labels"].reshape(-1) if feed.labelled else None
        loss_mask = mb["loss_mask"].reshape(-1) if feed.labelled else None
        stream = feed.stream(0, self.cache_columns(feed.seq))
        all_index = torch.arange(n, device=device)

        key_slots, key_live = feed.keys(stream, new, seq, 1)
        plan = self.step_plan(mb, new, key_slots, key_live)
        h = yield feed.run(feed.token_input(stage), new, seq, plan, stream,
                           cached=self.max_steps > 1)
        if self.max_steps == 1:  # the token pass alone (z^f = z^(1)); token-sharded under SP
            lm_loss, logits = feed.head(stage, stage.final_norm(h))
            return LatentOutput(loss=lm_loss, lm_loss=lm_loss, adaptive_loss=torch.zeros_like(lm_loss),
                                steps=torch.ones(n, dtype=torch.long, device=device),
                                records=[StepRecord(n, n, visible_pairs(plan))], logits=logits)
        sp = stage.sequence_parallel
        # ``active``: index of each row of this rank's h (its shard under SP);
        # ``q_index``: the step's queries across the TP group (== active without SP), at the
        # grid slots ``q_slots``; ``live``: which rows really execute (None = all; dead rows are
        # uncompacted halted tokens or SP padding, computed but never visible nor mixed);
        # ``q_real``: how many of the queries are not SP padding (padding is no model work).
        active = all_index.chunk(self.tp_size)[self.tp_rank] if sp else all_index
        q_index, q_slots, live, q_real = all_index, new, None, n
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
                active, reach, h_in, live, q_index, new_live = self._regather(
                    active[cont], decision.reach_next[cont], z[cont])
                q_real = int(new_live.sum())  # the padding is at the end
            else:
                active, reach, h_in = active[cont], decision.reach_next[cont], z[cont]
                q_index, q_real = active, active.numel()
            q_slots = new[q_index]
            key_slots, key_live = feed.keys(stream, q_slots, seq, k + 1, new_live)
            if lat.method == "adaptive" and lat.adaptive_loss_weight > 0 and feed.labelled:
                # sg(p_target^(k)) of the survivors: z^(k) is exactly their next input
                with torch.no_grad():
                    p_target = torch.exp(-token_cross_entropy(stage.logits(h_in), labels[q_index]))
                    if sp:
                        p_target = p_target.chunk(self.tp_size)[self.tp_rank]
                ptarget_tokens += q_real
                term = loss_mask[active] * p_target.pow(lat.adaptive_loss_beta) * reach
                adaptive_sum = adaptive_sum + (term if live is None else term * live).sum()
            plan = self.step_plan(mb, q_slots, key_slots, key_live)
            h = yield feed.run(h_in.to(h.dtype), q_slots, seq, plan, stream, k + 1, new_live,
                               cached=True)

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
        lm_loss, logits = feed.head(stage, z_final.to(h.dtype))
        adaptive_loss = adaptive_sum / loss_mask.sum().clamp(min=1.0) if feed.labelled \
            else torch.zeros_like(adaptive_sum)
        loss = lm_loss + lat.adaptive_loss_weight * adaptive_loss if lat.method == "adaptive" \
            else lm_loss
        return LatentOutput(loss=loss, lm_loss=lm_loss, adaptive_loss=adaptive_loss,
                            steps=steps, records=records, ptarget_tokens=ptarget_tokens,
                            logits=logits)

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

    def _baseline_output(self, feed: Feed, loss: torch.Tensor, logits: torch.Tensor | None,
                         plans: list[AttentionPlan]) -> LatentOutput:
        """A baseline's LatentOutput: one record per run (``plans``: its queries, e.g. pause's
        and ponderlm2's K slots per real token), every token K passes."""
        method, k = self.cfg.latent.method, self.max_steps
        n = feed.slots.numel()
        records = [StepRecord(p.rows * p.seq if p.dense else p.q_slots.numel(), n,
                              visible_pairs(p)) for p in plans]
        # pondering: K-1 extra LM heads and K-1 expected-embedding matmuls, all with gradient
        head_tokens = n * (2 * k - 1) if method == "pondering" else n
        steps = torch.full((n,), k, dtype=torch.long, device=feed.slots.device)
        return LatentOutput(loss=loss, lm_loss=loss, adaptive_loss=torch.zeros_like(loss),
                            steps=steps, records=records, head_tokens=head_tokens, logits=logits)

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

    def _gate_moments(self, out: LatentOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (unbiased) std of every live gate of the micro-batch (0, 0 without any),
        as float64 device scalars: no host sync here (the loop syncs once per iteration).
        Under SP each TP rank holds its own tokens' gates: count, sum and squared deviations
        are summed over the group, so every rank logs what one process would."""
        gates = [r.gates.double() for r in out.records if r.gates is not None]
        g = torch.cat(gates) if gates else out.steps.new_zeros(0, dtype=torch.float64)
        count, total = self._tp_reduce(torch.stack([g.new_tensor(g.numel()), g.sum()]))
        zero = g.new_zeros(())
        mean = torch.where(count > 0, total / count.clamp(min=1), zero)
        squares = self._tp_reduce((g - mean).pow(2).sum())
        std = torch.where(count > 1, (squares / (count - 1).clamp(min=1)).sqrt(), zero)
        return mean, std

    def stats(self, out: LatentOutput, mb: dict) -> dict[str, torch.Tensor | float]:
        """The micro-batch's metrics (:meth:`stat_names`): what the device computed stays a
        detached 0-d tensor, what the host knows is a float; nothing here syncs with the
        device (``training.metrics.sum_stats`` reduces a whole iteration with one sync)."""
        m = self.cfg.model
        rows, seq = mb["tokens"].shape
        n = rows * seq
        s: dict[str, torch.Tensor | float] = {
            "lm_loss": out.lm_loss.detach(), "tokens": float(n),
            "mean_steps": out.steps.float().mean()}
        if self.cfg.latent.method == "adaptive":
            s["adaptive_loss"] = out.adaptive_loss.detach()
            s["gate_mean"], s["gate_std"] = self._gate_moments(out)
        records = out.records[1:-1] if self.cfg.latent.method == "mor" else out.records
        for k in range(1, self.max_steps + 1):  # (MoR: the recursions, not its first/last layer)
            live = records[k - 1].live if k <= len(records) else 0
            s[f"active_frac_step{k}"] = live / n
        s["flops"] = float(self.counts(out).train_flops(m, self.stage.vocab_size))
        return s

    def counts(self, out: LatentOutput) -> StepCounts:
        """What ``out``'s forward ran (the arguments of the FLOPs formulas)."""
        n = out.steps.numel()
        layers = None if all(r.layers is None for r in out.records) else [
            self.cfg.model.num_layers if r.layers is None else r.layers for r in out.records]
        return StepCounts(
            [r.tokens for r in out.records], [r.pairs for r in out.records],
            head_tokens=out.head_tokens or n, ptarget_tokens=out.ptarget_tokens,
            router_tokens=out.router_tokens if out.router_tokens is not None else
            sum(r.tokens for k, r in enumerate(out.records, start=1)
                if k < self.max_steps)  # the router runs at every step < K_max
            if self.cfg.latent.method == "adaptive" else 0, step_layers=layers)

    def forward_flops(self, out: LatentOutput) -> float:
        """Forward FLOPs of ``out``'s run (no p_target head): what inference costs."""
        c = self.counts(out)
        return latent_forward_flops(self.cfg.model, self.stage.vocab_size, c.step_tokens,
                                    c.step_pairs, c.head_tokens, c.router_tokens, c.step_layers)
