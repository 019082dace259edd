"""Small-scale reproduction study (issue #11): every method on the default corpus, one command.

The logic behind ``tools/reproduce_study.py`` (command line:
:mod:`megatron_latentcot.cli.reproduce_study`).

    python tools/reproduce_study.py [--budget 1.0] [--threads 1] [--dry-run] [--analyze-only]
    bash examples/reproduce_small.sh ...          # the same, with the thread settings

Steps, each skipped when its output exists (so a re-run resumes):

1. data: the default corpus (``tools/prepare_corpus.py``: State of the Union addresses, 12 of
   them held out as validation, *Moby Dick* as out-of-domain held-out text), a sentencepiece BPE
   of ``--vocab-size`` pieces trained on the train split, Megatron ``.bin/.idx`` datasets, under
   ``--data-dir``.
2. training: the runs of :func:`study_plan`, one process at a time
   (``python -m megatron_latentcot.pretrain --config examples/configs/tiny*.yaml`` + overrides),
   into ``--runs-dir/<name>`` (``train.load = train.save``: an interrupted run resumes from its
   last checkpoint).
3. evaluation of each finished run (in this process): validation and held-out perplexity
   (``megatron_latentcot.eval.perplexity``, sliding windows), per-token readouts on a fixed
   validation stream (``megatron_latentcot.eval.study``), steps histograms, training and
   inference FLOPs. Written to ``--out/runs/<name>.json`` (the run's *final eval JSON*: a run
   that has one is skipped) and ``--out/tokens/<name>.npz``.
4. analysis from those files only: ``--out/study.{json,md}``, ``docs/results_*.png``, and
   ``tools/compare_flops.py``'s run table and curves in ``--out/compare/`` (needs the run dirs;
   :func:`megatron_latentcot.analysis.compare.compare_runs`).

``--budget`` scales the training iterations of every run (1.0 = 140 iterations of 16 x 128
tokens, about 80 CPU-minutes in all on 2 shared cores; 0.05 is a smoke test). All runs see
the same tokens in the same order for a given seed (the data order follows ``train.seed``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from megatron_latentcot import flops
from megatron_latentcot.analysis import compare
from megatron_latentcot.config import ModelConfig
from megatron_latentcot.plan import total_params

REPO = Path(__file__).resolve().parents[2]

BASE_ITERS = 140
SEQ = 128
BATCH = 16
SEEDS = (1234, 1235)
EVAL_TOKENS = 16384  # perplexity: the first tokens of the validation / held-out documents
STREAM_ROWS = {"valid": 64, "heldout": 32}  # per-token readouts: rows x SEQ tokens of each stream
# The small Llama of every run (the compute-matched baseline changes num_layers only).
MODEL = {"model.hidden_size": 128, "model.num_layers": 4, "model.num_attention_heads": 4,
         "model.num_query_groups": 2, "model.ffn_hidden_size": 344,
         "model.max_position_embeddings": 1024}
DOCS_PLOTS = {"ppl": "results_ppl_vs_flops.png", "steps": "results_steps_vs_difficulty.png",
              "gain": "results_fig2_gain.png"}


class StudyError(Exception):
    """A step of the study failed; the message says which and how to go on."""


@dataclasses.dataclass
class RunSpec:
    name: str
    config: str  # examples/configs/*.yaml, relative to the repository
    overrides: dict[str, Any]
    method: str
    group: str  # runs of a group differ by seed only
    seed: int
    label: str

    def args(self) -> list[str]:
        return [f"{k}={_yaml(v)}" for k, v in self.overrides.items()]


def _yaml(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_yaml(x) for x in v) + "]"
    return str(v)


def iterations(budget: float) -> int:
    if not budget > 0:
        raise StudyError(f"--budget {budget}: expected a positive factor")
    return max(4, round(BASE_ITERS * budget))


def data_overrides(data_dir: str) -> dict[str, Any]:
    return {"data.data_path": [f"{data_dir}/train_text_document"],
            "data.valid_path": f"{data_dir}/valid_text_document",
            "data.heldout_path": f"{data_dir}/heldout_text_document",
            "data.tokenizer_model": f"{data_dir}/tokenizer.model"}


def study_plan(iters: int, data_dir: str, runs_dir: str,
               deep_layers: int | None = None) -> list[RunSpec]:
    """Every run of the study, in training order (the key methods' two seeds first).

    ``deep_layers``: the compute-matched vanilla's depth (:func:`matched_layers`, known once
    ``adaptive_s1`` has trained); None leaves that run out.
    """
    def spec(name, config, method, group, label, seed=SEEDS[0], **extra) -> RunSpec:
        o: dict[str, Any] = dict(MODEL)
        o.update(data_overrides(data_dir))
        o.update({"data.seq_length": SEQ, "train.micro_batch_size": BATCH,
                  "train.global_batch_size": BATCH, "train.train_iters": iters,
                  "train.lr_warmup_iters": max(1, iters // 10),
                  "train.eval_interval": max(1, iters // 4), "train.eval_iters": 1,
                  "train.log_interval": max(1, iters // 16),
                  "train.save_interval": max(1, iters // 2), "train.seed": seed,
                  "train.save": f"{runs_dir}/{name}", "train.load": f"{runs_dir}/{name}"})
        o.update(extra)
        return RunSpec(name, f"examples/configs/{config}.yaml", o, method, group, seed, label)

    runs = [
        spec("vanilla_s1", "tiny", "vanilla", "vanilla", "vanilla"),
        spec("adaptive_s1", "tiny_adaptive", "adaptive", "adaptive", "adaptive K4 τ0.1 λ0.1"),
        spec("vanilla_s2", "tiny", "vanilla", "vanilla", "vanilla", seed=SEEDS[1]),
        spec("adaptive_s2", "tiny_adaptive", "adaptive", "adaptive", "adaptive K4 τ0.1 λ0.1",
             seed=SEEDS[1]),
        spec("looped_k2", "tiny_looped", "looped", "looped_k2", "looped K2",
             **{"latent.max_steps": 2}),
        spec("looped_k4", "tiny_looped", "looped", "looped_k4", "looped K4",
             **{"latent.max_steps": 4}),
        spec("adaptive_tau03", "tiny_adaptive", "adaptive", "adaptive_tau03",
             "adaptive K4 τ0.3 λ0.1", **{"latent.tau": 0.3}),
        spec("adaptive_lam1", "tiny_adaptive", "adaptive", "adaptive_lam1",
             "adaptive K4 τ0.1 λ1.0", **{"latent.adaptive_loss_weight": 1.0}),
        spec("pause", "tiny_pause", "pause", "pause", "pause K4 (3 pauses)",
             **{"latent.max_steps": 4}),
        spec("pondering", "tiny_pondering", "pondering", "pondering", "pondering K4",
             **{"latent.max_steps": 4}),
        # PonderLM-2 as its authors train it: 1 latent thought (K = 2), J = 3 Jacobi passes.
        spec("ponderlm2", "tiny_ponderlm2", "ponderlm2", "ponderlm2", "PonderLM-2 K2 J3",
             **{"latent.max_steps": 2, "latent.jacobi_iterations": 3}),
        # MoR, expert-choice with the authors' default capacities (N_r - r + 1) / N_r: the
        # study's 4 layers fit N_r = 2 (first and last layer unique, a shared block of 1 layer;
        # capacities (1, 1/2), effective depth 2 + 1 + 1/2 per token).
        spec("mor", "tiny_mor", "mor", "mor", "MoR expert N_r=2 (1, 1/2)",
             **{"latent.max_steps": 2, "mor.num_recursion": 2, "mor.router": "expert"}),
        # tiny.yaml's vanilla keeps embeddings at x1.0; every other method's config scales them
        # by sqrt(2.5 d): this run separates that difference from the method's.
        spec("vanilla_emb", "tiny", "vanilla", "vanilla_emb", "vanilla, embeddings x sqrt(2.5d)",
             **{"model.embedding_multiplier": None}),
        # tiny_pause.yaml scales token embeddings by sqrt(2.5 d) but never its pause embeddings
        # (410m/1.4b/7b_pause.yaml keep both at x1.0): pause with the paper-scale setting.
        spec("pause_emb1", "tiny_pause", "pause", "pause_emb1", "pause K4, embeddings x1.0",
             **{"latent.max_steps": 4, "model.embedding_multiplier": 1.0}),
    ]
    if deep_layers is not None:
        runs.append(spec("vanilla_deep", "tiny", "vanilla", "vanilla_deep",
                         f"vanilla {deep_layers} layers (FLOPs-matched to adaptive_s1)",
                         **{"model.num_layers": deep_layers}))
    return runs


# -- FLOPs helpers -------------------------------------------------------------------------------

def model_config(layers: int | None = None) -> ModelConfig:
    m = {k.split(".", 1)[1]: v for k, v in MODEL.items()}
    if layers is not None:
        m["num_layers"] = layers
    return ModelConfig(**m)


def vanilla_flops_per_token(layers: int, vocab: int, seq: int = SEQ) -> float:
    """Exact training FLOPs per token of the study's vanilla model with ``layers`` layers."""
    return flops.train_flops_per_token(model_config(layers), vocab,
                                       flops.method_counts("vanilla", seq, 1), seq)


def matched_layers(target_flops_per_token: float, vocab: int, seq: int = SEQ,
                   lo: int = 4, hi: int = 64) -> int:
    """The depth whose vanilla training FLOPs per token are closest to the target
    (ties to the shallower)."""
    if not target_flops_per_token > 0:
        raise StudyError(f"FLOPs target {target_flops_per_token}: expected a positive number")
    return min(range(lo, hi + 1),
               key=lambda n: (abs(vanilla_flops_per_token(n, vocab, seq) - target_flops_per_token), n))


def final_readouts(model, tokens, labels, batch_rows: int = 16):
    """MoR's readouts: its recursions' states pass no final norm or LM head, so the only
    readout is the prediction, put at the token's depth (its recursions run); NaN before."""
    import numpy as np
    import torch

    from megatron_latentcot.eval.study import Readouts
    from megatron_latentcot.inference.decoder import training_forward

    k_max = model.scheduler.max_steps
    nll, steps = [], []
    for start in range(0, tokens.shape[0], batch_rows):
        tok, lab = (torch.as_tensor(a[start:start + batch_rows], dtype=torch.long,
                                    device=model.device) for a in (tokens, labels))
        tf = training_forward(model.scheduler, tok, lab)
        logp = torch.log_softmax(tf.logits.double(), dim=-1)
        nll.append(-logp.gather(-1, lab.unsqueeze(-1)).squeeze(-1).cpu().numpy())
        steps.append(tf.steps.cpu().numpy())
    nll_a, steps_a = np.concatenate(nll), np.concatenate(steps)
    if steps_a.min() < 1 or steps_a.max() > k_max:
        raise StudyError(f"mor: depths {steps_a.min()}..{steps_a.max()} outside 1..{k_max}")
    p = np.full((*nll_a.shape, k_max), np.nan)
    np.put_along_axis(p, (steps_a - 1)[..., None], np.exp(-nll_a)[..., None], axis=-1)
    return Readouts(np.asarray(tokens), np.asarray(labels), nll_a, steps_a, p)


# -- results on disk -----------------------------------------------------------------------------

def result_path(out: Path, name: str) -> Path:
    return out / "runs" / f"{name}.json"


def tokens_path(out: Path, name: str) -> Path:
    return out / "tokens" / f"{name}.npz"


def finished(out: Path, spec: RunSpec) -> bool:
    """True when ``spec``'s final eval JSON exists and was made by the same plan; raises when
    it belongs to a different plan (another budget or settings), so results never mix."""
    path = result_path(out, spec.name)
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StudyError(f"{path}: unreadable ({e}); delete it to redo {spec.name}") from None
    if saved.get("overrides") != json.loads(json.dumps(spec.overrides)) or \
            saved.get("config") != spec.config:
        diff = sorted(k for k in set(saved.get("overrides", {})) | set(spec.overrides)
                      if saved.get("overrides", {}).get(k) != json.loads(json.dumps(
                          spec.overrides)).get(k))
        raise StudyError(f"{path} was made by a different plan (differs in: "
                         f"{', '.join(diff) or 'config'}); use another --out, or --force to redo")
    return True


def checkpoint_iteration(run_dir: Path) -> int | None:
    latest = run_dir / "latest"
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    try:
        return int(name.removeprefix("iter_"))
    except ValueError:
        return None


def read_metrics(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    return compare.read_metrics(run_dir / "metrics.jsonl")


def code_version() -> dict[str, Any]:
    """The commit the study ran from (``MLC_CODE_COMMIT`` overrides ``git rev-parse HEAD``)."""
    commit = os.environ.get("MLC_CODE_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                    text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = None
    return {"commit": commit, "note": os.environ.get("MLC_CODE_NOTE")}


# -- steps ----------------------------------------------------------------------------------------

def _run(cmd: list[str], env: dict[str, str], log: Path | None = None) -> None:
    if log is None:
        res = subprocess.run(cmd, cwd=REPO, env=env)
    else:
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            res = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = ""
        if log is not None and log.is_file():
            tail = "\n".join(log.read_text().splitlines()[-15:])
        raise StudyError(f"command failed (exit {res.returncode}): {' '.join(cmd)}\n{tail}")


def _tool(name: str) -> list[str]:
    """``tools/<name>.py`` as its package module (the package does not depend on tools/)."""
    return [sys.executable, "-m", f"megatron_latentcot.cli.{name}"]


def child_env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                PYTHONUNBUFFERED="1")


def prepare_data(data_dir: Path, vocab_size: int, threads: int) -> None:
    """Corpus (cached), tokenizer and indexed datasets; each skipped when present."""
    env = child_env(threads)
    need = [data_dir / f"{s}_text_document.idx" for s in ("train", "valid", "heldout")]
    if (data_dir / "tokenizer.model").is_file() and all(p.is_file() for p in need):
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"== data: corpus, {vocab_size}-piece tokenizer, indexed datasets -> {data_dir}", flush=True)
    out = subprocess.run([*_tool("prepare_corpus"), "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise StudyError(f"tools/prepare_corpus.py failed:\n{out.stderr[-2000:]}")
    corpus = json.loads(out.stdout.strip().splitlines()[-1])
    if not (data_dir / "tokenizer.model").is_file():
        _run([*_tool("train_tokenizer"), "--input", corpus["train"],
              "--output-prefix", str(data_dir / "tokenizer"), "--vocab-size", str(vocab_size),
              "--model-type", "bpe", "--num-threads", str(threads)], env)
    for split in ("train", "valid", "heldout"):
        if not (data_dir / f"{split}_text_document.idx").is_file():
            _run([*_tool("preprocess_data"), "--input", corpus[split],
                  "--json-keys", "text", "--output-prefix", str(data_dir / split),
                  "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                  str(data_dir / "tokenizer.model"), "--append-eod", "--workers", "1"], env)


def train(spec: RunSpec, runs_dir: Path, threads: int) -> dict[str, float]:
    """Train (or resume) ``spec`` to its last iteration; returns wall / child CPU seconds."""
    run_dir = runs_dir / spec.name
    iters = spec.overrides["train.train_iters"]
    have = checkpoint_iteration(run_dir)
    if have == iters:
        return {}
    if have is not None and have > iters:
        raise StudyError(f"{run_dir} holds a checkpoint at iteration {have}, beyond this plan's "
                         f"{iters} (another --budget?): use another --runs-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"== train {spec.name}: {spec.config} {' '.join(spec.args())}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    _run([sys.executable, "-m", "megatron_latentcot.pretrain", "--config", spec.config,
          *spec.args()], child_env(threads), run_dir / "train.log")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if checkpoint_iteration(run_dir) != iters:
        raise StudyError(f"{spec.name}: training ended without a checkpoint at iteration {iters} "
                         f"(see {run_dir / 'train.log'})")
    times = {"wall_s": time.time() - t0,
             "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}
    (run_dir / "study_time.json").write_text(json.dumps(times))
    return times


def evaluate(spec: RunSpec, run_dir: Path, out: Path, data_dir: Path) -> dict[str, Any]:
    """The run's final eval JSON (and token arrays): see the module docstring."""
    import numpy as np

    from megatron_latentcot.eval.perplexity import (
        documents_from_indexed,
        evaluate_perplexity,
        truncate_documents,
    )
    from megatron_latentcot.eval.study import (
        step_gain_curves,
        step_readouts,
        steps_histogram,
        stream_rows,
    )
    from megatron_latentcot.inference.loading import load_model

    print(f"== evaluate {spec.name}", flush=True)
    t0 = time.time()
    model = load_model(run_dir)
    tok, cfg = model.tokenizer, model.cfg
    k = 1 if cfg.latent.method == "vanilla" else cfg.latent.max_steps
    seq = cfg.data.seq_length
    ppl, hists, readouts = {}, {}, {}
    # MoR expert-choice's top-k (its authors' training and evaluation rule) picks each
    # recursion's tokens per window, seeing later tokens' router scores; its decoder routes by
    # the causal threshold rule sigmoid(a) >= 0.5: both perplexities are reported.
    causal = (cfg.latent.method == "mor" and cfg.mor.router == "expert"
              and cfg.mor.expert_selection == "topk")
    ppl_causal: dict[str, Any] = {}

    def perplexity(docs) -> dict[str, Any]:
        r = evaluate_perplexity(model, truncate_documents(docs, EVAL_TOKENS, tok), tok.eod,
                                window=seq, stride=seq, batch_size=BATCH)
        return {key: v for key, v in r.to_dict().items()
                if key in ("docs", "tokens", "loss", "token_perplexity", "bits_per_byte",
                           "mean_steps")}

    for split, prefix in (("valid", cfg.data.valid_path), ("heldout", cfg.data.heldout_path)):
        docs = documents_from_indexed(prefix, tok)
        ppl[split] = perplexity(docs)
        if causal:  # the scheduler reads cfg on every forward
            cfg.mor.expert_selection = "threshold"
            try:
                ppl_causal[split] = perplexity(docs)
            finally:
                cfg.mor.expert_selection = "topk"
        x, y = stream_rows([d.ids for d in docs], tok.eod, STREAM_ROWS[split], seq)
        ro = (final_readouts if spec.method == "mor" else step_readouts)(
            model, x, y, batch_rows=BATCH)
        hists[split] = {"mean": float(ro.steps.mean()), "hist": steps_histogram(ro.steps, k),
                        "stream_loss": float(ro.nll.mean())}
        readouts[split] = ro
    tokens_path(out, spec.name).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(tokens_path(out, spec.name), **readouts["valid"].to_npz())
    metrics = read_metrics(run_dir)
    train_recs = metrics.get("train", [])
    last = train_recs[-1]
    steps_logged = [r["mean_steps"] for r in train_recs if "mean_steps" in r]
    times_file = run_dir / "study_time.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    dist = hists["valid"]["hist"]
    res = {
        "name": spec.name, "method": spec.method, "group": spec.group, "label": spec.label,
        "seed": spec.seed, "config": spec.config, "overrides": spec.overrides,
        "max_steps": k, "tau": cfg.latent.tau if spec.method == "adaptive" else None,
        "lambda": cfg.latent.adaptive_loss_weight if spec.method == "adaptive" else None,
        "num_layers": cfg.model.num_layers, "vocab": model.vocab_size,
        "embedding_multiplier": cfg.model.embedding_multiplier,
        "params": total_params(cfg, model.vocab_size),
        "train": {"iterations": last["iteration"], "tokens": last["consumed_tokens"],
                  "flops": last["train_flops"],
                  "flops_per_token": last["train_flops"] / last["consumed_tokens"],
                  "final_lm_loss": last["lm_loss"],
                  "mean_steps": sum(steps_logged) / len(steps_logged) if steps_logged else None,
                  "last_mean_steps": last.get("mean_steps"),
                  "s_per_iter_last": last.get("s_per_iter"), **times,
                  "curve": [{"iteration": r["iteration"], "ppl": r["ppl"], "split": split}
                            for split in ("valid", "heldout") for r in metrics.get(split, [])]},
        "eval": ppl, "steps": hists,
        **({"eval_causal_threshold": ppl_causal} if ppl_causal else {}),
        "inference_flops_per_token": flops.inference_flops_per_token(
            cfg.model, model.vocab_size, spec.method, seq, k,
            dist if spec.method == "adaptive" else None, **compare.mor_flops_args(cfg)),
        "readouts_valid": {key: v for key, v in step_gain_curves(readouts["valid"].p_target).items()
                           if key.startswith("mean_")},
        "eval_wall_s": time.time() - t0, "code": code_version(),
    }
    path = result_path(out, spec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(path)  # the final eval JSON appears only once complete
    return res


# -- analysis ----------------------------------------------------------------------------------

def load_results(out: Path) -> dict[str, dict[str, Any]]:
    found = sorted((out / "runs").glob("*.json"))
    return {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in found}


def load_tokens(out: Path, name: str):
    import numpy as np

    from megatron_latentcot.eval.study import Readouts

    path = tokens_path(out, name)
    if not path.is_file():
        return None
    with np.load(path) as data:
        return Readouts.from_npz(data)


def _stats(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "sd": sd, "min": min(values), "max": max(values)}


def analyze(results: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    """Tables and analyses from the final eval JSONs and token arrays (no checkpoints needed)."""
    import numpy as np

    from megatron_latentcot.eval.study import gain_curve, step_gain_curves, steps_vs_difficulty

    van = results.get("vanilla_s1")
    base_flops = van["train"]["flops"] if van else None
    base_inf = van["inference_flops_per_token"] if van else None
    rows = []
    for r in results.values():
        rows.append({
            "run": r["name"], "label": r["label"], "method": r["method"], "group": r["group"],
            "seed": r["seed"], "K": r["max_steps"], "tau": r["tau"], "lambda": r["lambda"],
            "layers": r["num_layers"], "params": r["params"], "tokens": r["train"]["tokens"],
            "train_flops": r["train"]["flops"],
            "train_flops_x": r["train"]["flops"] / base_flops if base_flops else None,
            "inference_flops_per_token": r["inference_flops_per_token"],
            "inference_x": r["inference_flops_per_token"] / base_inf if base_inf else None,
            "valid_ppl": r["eval"]["valid"]["token_perplexity"],
            "heldout_ppl": r["eval"]["heldout"]["token_perplexity"],
            "valid_bpb": r["eval"]["valid"]["bits_per_byte"],
            "heldout_bpb": r["eval"]["heldout"]["bits_per_byte"],
            "steps_valid": r["steps"]["valid"]["mean"], "steps_heldout": r["steps"]["heldout"]["mean"],
            "steps_hist_valid": r["steps"]["valid"]["hist"],
            "steps_hist_heldout": r["steps"]["heldout"]["hist"],
            "train_steps": r["train"]["mean_steps"], "final_train_loss": r["train"]["final_lm_loss"],
            "wall_s": r["train"].get("wall_s"), "cpu_s": r["train"].get("cpu_s"),
            "eval_wall_s": r.get("eval_wall_s")})
    order = {n: i for i, n in enumerate(s.name for s in study_plan(1, "", "", 0))}
    rows.sort(key=lambda x: order.get(x["run"], 99))
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    seeds = {g: {key: _stats([x[key] for x in rs]) for key in ("valid_ppl", "heldout_ppl",
                                                                 "train_flops", "steps_valid")}
             | {"runs": [x["run"] for x in rs]} for g, rs in groups.items() if len(rs) > 1}

    analysis: dict[str, Any] = {"rows": rows, "seeds": seeds, "correlation": {}, "gain": {}}
    toks = {name: load_tokens(out, name) for name in results}
    refs = {n: t for n, t in toks.items() if t is not None and results[n]["method"] == "vanilla"
            and results[n]["group"] == "vanilla"}
    for name, t in toks.items():
        r = results[name]
        if t is None or r["method"] not in ("adaptive", "mor"):  # MoR: recursions per token
            continue
        entry = {"own_loss": steps_vs_difficulty(t.steps, t.nll, r["max_steps"])}
        for ref_name, ref in refs.items():
            entry[f"vs_{ref_name}"] = steps_vs_difficulty(t.steps, ref.nll, r["max_steps"])
        analysis["correlation"][name] = entry
    analysis["gain_by_reference"] = {}
    for name, t in toks.items():
        # MoR reads out once (its recursions' states pass no LM head): no step-to-step gain
        if t is not None and results[name]["max_steps"] > 1 and results[name]["method"] != "mor":
            analysis["gain"][name] = step_gain_curves(t.p_target)
            # binned by an independent difficulty estimate: the other seed's vanilla p_target
            ref = "vanilla_s2" if results[name]["seed"] == SEEDS[0] else "vanilla_s1"
            if toks.get(ref) is not None:
                analysis["gain_by_reference"][name] = {
                    "reference": ref, **step_gain_curves(t.p_target, by=np.exp(-toks[ref].nll))}
    final_p = {n: t.p_target[..., -1] if results[n]["method"] not in ("adaptive", "mor") else None
               for n, t in toks.items() if t is not None}
    cross = {}
    if final_p.get("vanilla_s1") is not None:
        for a, b in (("vanilla_s1", "looped_k2"), ("vanilla_s1", "looped_k4"),
                     ("looped_k2", "looped_k4"), ("vanilla_s1", "vanilla_s2"),
                     ("vanilla_s1", "vanilla_deep")):
            if final_p.get(a) is not None and final_p.get(b) is not None:
                cross[f"{a}->{b}"] = gain_curve(final_p[a], final_p[b])
    analysis["gain_across_models"] = cross
    deep = results.get("vanilla_deep")
    ada = results.get("adaptive_s1")
    if deep and ada:
        analysis["compute_match"] = {
            "target_run": "adaptive_s1", "layers": deep["num_layers"],
            "adaptive_flops_per_token": ada["train"]["flops_per_token"],
            "deep_flops_per_token": deep["train"]["flops_per_token"],
            "ratio": deep["train"]["flops_per_token"] / ada["train"]["flops_per_token"]}
    return analysis


def _fmt(x: Any, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, spec)


def render_markdown(analysis: dict[str, Any], meta: dict[str, Any]) -> str:
    rows = analysis["rows"]
    lines = ["# Small-scale reproduction: generated tables", "",
             f"Generated by `tools/reproduce_study.py` from `{meta['out']}/runs/*.json` "
             f"(code {meta.get('commit') or 'unknown'}). Perplexities: first {EVAL_TOKENS:,} "
             f"tokens of the validation addresses / of *Moby Dick*, each document in disjoint "
             f"windows of {SEQ} tokens. Steps: mean passes per token on the first "
             f"{STREAM_ROWS['valid']} (validation) / {STREAM_ROWS['heldout']} (held-out) rows of "
             f"{SEQ} tokens of each document stream; per-token analyses on the validation rows."
             " Inference FLOPs: per generated token at position seq/2 with a K/V "
             "cache (`tools/compare_flops.py`, adaptive at its measured step distribution).", "",
             "| run | method | seed | layers | params | train tokens | train FLOPs | x vanilla "
             "| infer FLOPs/token | x vanilla | valid PPL | held-out PPL | steps valid | steps "
             "held-out | train wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['label']} | {r['seed']} | {r['layers']} | {r['params']:,} | "
            f"{r['tokens']:,} | {r['train_flops']:.3g} | {_fmt(r['train_flops_x'])} | "
            f"{r['inference_flops_per_token']:.3g} | {_fmt(r['inference_x'])} | "
            f"{r['valid_ppl']:.2f} | {r['heldout_ppl']:.2f} | {r['steps_valid']:.2f} | "
            f"{r['steps_heldout']:.2f} | {_fmt(r['wall_s'], '.0f')} |")
    lines += ["", "## Seeds", "", "| group | runs | valid PPL mean ± sd [min, max] | held-out PPL "
              "mean ± sd [min, max] | steps valid |", "|---|---|---|---|---|"]
    for g, s in analysis["seeds"].items():
        def ms(d):
            return f"{d['mean']:.2f} ± {_fmt(d['sd'])} [{d['min']:.2f}, {d['max']:.2f}]"
        lines.append(f"| {g} | {', '.join(s['runs'])} | {ms(s['valid_ppl'])} | "
                     f"{ms(s['heldout_ppl'])} | {s['steps_valid']['mean']:.2f} |")
    lines += ["", "## Steps against difficulty (validation stream)", "",
              "Spearman ρ between the passes an adaptive model (MoR: the recursions its router "
              "chose) ran for a token and a reference "
              "loss on that token (95% interval: bootstrap over rows). Last columns: share of "
              "tokens and mean reference loss (vanilla_s1) per step count.", "",
              "| run | ρ vs vanilla_s1 loss [95% CI] | ρ vs vanilla_s2 loss | ρ vs own loss | "
              "tokens per step 1/2/3/4 | vanilla_s1 loss per step 1/2/3/4 |",
              "|---|---|---|---|---|---|"]
    for name, c in analysis["correlation"].items():
        v1, v2, own = c.get("vs_vanilla_s1"), c.get("vs_vanilla_s2"), c["own_loss"]

        def rho(d):
            if d is None:
                return "n/a"
            ci = d["spearman_ci95"]
            return f"{_fmt(d['spearman'], '.3f')}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        ref = v1 or own
        share = " / ".join(f"{b['frac']:.3f}" for b in ref["by_steps"])
        loss = " / ".join(_fmt(b["mean_ref_nll"]) for b in ref["by_steps"])
        lines.append(f"| {name} | {rho(v1)} | {rho(v2)} | {rho(own)} | {share} | {loss} |")
    lines += ["", "## Gain of one more step against current p_target (Figure 2 shape)", "",
              "Mean of p_target^(k+1) - p_target^(k) per bin of p_target^(k), pooled over "
              "transitions k -> k+1 (looped: readouts of intermediate repeats through the final "
              "norm and LM head); cells: mean gain (tokens). `binned by vanilla_s2 p_target`: "
              "the same gains, tokens binned by an independent model's p_target (no "
              "regression-to-the-mean slope). `across models`: the final p_target of one model "
              "against another's on the same tokens; vanilla_s1->vanilla_s2 is the no-effect "
              "control (two seeds of the same model: regression to the mean alone).", ""]
    curves = [(f"{n} (pooled steps)", g["pooled"]) for n, g in analysis["gain"].items()]
    curves += [(f"{n} (pooled steps, binned by {g['reference']} p_target)", g["pooled"])
               for n, g in analysis.get("gain_by_reference", {}).items()
               if n in ("looped_k4", "looped_k2", "adaptive_s1")]
    curves += [(f"{n} (across models)", c) for n, c in analysis["gain_across_models"].items()]
    if curves:
        edges = curves[0][1]
        header = " | ".join(f"[{lo:g}, {hi:g})" for lo, hi in zip(edges["lo"], edges["hi"]))
        lines += [f"| curve | all | {header} |", "|---|---:|" + "---:|" * len(edges["lo"])]
        for label, c in curves:
            cells = " | ".join("" if g is None else f"{g:+.3f} ({n})"
                               for g, n in zip(c["mean_gain"], c["count"]))
            lines.append(f"| {label} | {_fmt(c['overall_gain'], '+.4f')} | {cells} |")
    cm = analysis.get("compute_match")
    if cm:
        lines += ["", f"Compute-matched vanilla: {cm['layers']} layers, "
                  f"{cm['deep_flops_per_token']:.3g} training FLOPs/token vs adaptive_s1 "
                  f"{cm['adaptive_flops_per_token']:.3g} (ratio {cm['ratio']:.3f})."]
    return "\n".join(lines) + "\n"


def plot_all(analysis: dict[str, Any], results: dict[str, dict[str, Any]], docs: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    docs.mkdir(parents=True, exist_ok=True)
    written = []
    rows = analysis["rows"]
    colors = {}
    palette = [matplotlib.colors.to_hex(c) for c in plt.cm.tab10.colors] + ["#222222", "#b8860b"]
    for r in rows:
        colors.setdefault(r["group"], palette[len(colors) % len(palette)])

    # 1. perplexity against training FLOPs (and against inference FLOPs per token)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    for ax, key, xkey, title in ((axes[0], "valid_ppl", "train_flops", "Validation (SOTU)"),
                                 (axes[1], "heldout_ppl", "train_flops", "Held-out (Moby Dick)"),
                                 (axes[2], "valid_ppl", "inference_flops_per_token",
                                  "Validation vs inference cost")):
        values = sorted(r[key] for r in rows)
        top = values[len(values) // 2] * 1.3  # runs far above the rest are drawn at the top edge
        seen, n_off = set(), 0
        for r in rows:
            label = r["label"] if r["group"] not in seen else None
            seen.add(r["group"])
            y, off = min(r[key], top), r[key] > top
            ax.scatter(r[xkey], y, color=colors[r["group"]], s=50, label=label, zorder=3,
                       marker="^" if off else ("o" if r["seed"] == SEEDS[0] else "s"))
            ax.annotate(f"{r['run']} ({r[key]:.0f}, off scale)" if off else r["run"], (r[xkey], y),
                        xytext=(-60, -10 - 9 * n_off) if off else (4, 3),
                        textcoords="offset points", fontsize=6, color=colors[r["group"]])
            n_off += off
        ax.set_ylim(values[0] * 0.97, top * 1.02)
        for g, s in analysis["seeds"].items():  # seeds: a vertical bar over their range
            xs = [r[xkey] for r in rows if r["group"] == g]
            ax.plot([sum(xs) / len(xs)] * 2, [s[key]["min"], s[key]["max"]],
                    color=colors[g], lw=2, alpha=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs" if xkey == "train_flops" else "inference FLOPs / token")
        ax.set_ylabel("perplexity")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Perplexity against compute (circles: seed 1234, squares: seed 1235, bars: seed "
                 "range, triangles: off the scale)")
    written.append(_save(fig, docs / DOCS_PLOTS["ppl"]))

    # 2. steps against difficulty
    corr = analysis["correlation"]
    if corr:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        width = 0.8 / max(len(corr), 1)
        for i, (name, c) in enumerate(corr.items()):
            ref = c.get("vs_vanilla_s1") or c["own_loss"]
            ks = [b["steps"] for b in ref["by_steps"]]
            axes[0].bar([k + (i - (len(corr) - 1) / 2) * width for k in ks],
                        [b["frac"] for b in ref["by_steps"]], width=width,
                        label=f"{name} ({results[name]['label']})")
            pts = [(b["steps"], b["mean_ref_nll"], b["sem"] or 0.0) for b in ref["by_steps"]
                   if b["count"] >= 20]
            if pts:
                xs, ys, es = zip(*pts)
                axes[1].errorbar(xs, ys, yerr=es, marker="o", capsize=3,
                                 label=f"{name}: ρ = {ref['spearman']:.3f}")
        axes[0].set_xlabel("passes run (token pass + latent steps)")
        axes[0].set_ylabel("share of tokens")
        axes[0].set_title("Distribution of steps (validation stream)")
        axes[0].legend(fontsize=7)
        axes[1].set_xlabel("passes run by the adaptive model")
        axes[1].set_ylabel("vanilla_s1 loss on the token (nats)")
        axes[1].set_title("Are hard tokens given more steps? (groups of >= 20 tokens)")
        axes[1].legend(fontsize=7)
        for ax in axes:
            ax.set_xticks(range(1, 5))
            ax.grid(True, alpha=0.3)
        written.append(_save(fig, docs / DOCS_PLOTS["steps"]))

    # 3. Figure 2 shape
    gain = analysis["gain"]
    if gain:
        fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
        main_name = "looped_k4" if "looped_k4" in gain else next(iter(gain))
        by_ref = analysis.get("gain_by_reference", {})
        for ax, source, xlabel in ((axes[0], gain, "current p_target^(k) (bin mean)"),
                                   (axes[1], by_ref, "p_target of the other seed's vanilla "
                                                     "(bin mean)")):
            if main_name in source:
                for tr, c in source[main_name]["transitions"].items():
                    _gain_line(ax, c, f"{main_name}: step {tr}")
            if "adaptive_s1" in source:
                _gain_line(ax, source["adaptive_s1"]["pooled"], "adaptive_s1: pooled steps", ls="--")
            ax.set_xlabel(xlabel)
        axes[0].set_title("Gain of one more step vs current p_target")
        axes[1].set_title("The same gains, binned by an independent difficulty")
        for name, c in analysis["gain_across_models"].items():
            _gain_line(axes[2], c, name, ls=":" if name == "vanilla_s1->vanilla_s2" else "-")
        axes[2].set_title("Across models (seed pair = no-effect control)")
        axes[2].set_xlabel("p_target of the first model (bin mean)")
        for ax in axes:
            ax.axhline(0, color="k", lw=0.8)
            ax.set_ylabel("mean gain in p_target")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        written.append(_save(fig, docs / DOCS_PLOTS["gain"]))
    return written


def _save(fig: Any, path: Path) -> Path:
    return compare.save_figure(fig, path, dpi=110)


def _gain_line(ax, c: dict[str, list], label: str, ls: str = "-", min_count: int = 20) -> None:
    pts = [(p, g, e or 0.0) for p, g, e, n in zip(c["mean_p"], c["mean_gain"], c["sem"], c["count"])
           if n >= min_count]
    if pts:
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=2, ls=ls, label=label)


def compare_curves(results: dict[str, dict[str, Any]], runs_dir: Path, out: Path) -> None:
    """``tools/compare_flops.py``'s table and curves, when the run directories of every result
    are here (a partial set, e.g. after ``--only`` on another machine, would overwrite the
    complete comparison with fewer runs: skipped with a message)."""
    order = [s.name for s in study_plan(1, "", "", 0)]  # vanilla_s1 first: the FLOPs reference
    names = sorted(results, key=lambda n: order.index(n) if n in order else len(order))
    dirs = [runs_dir / n for n in names if (runs_dir / n / "metrics.jsonl").is_file()]
    if len(dirs) < len(names):
        missing = sorted(set(names) - {d.name for d in dirs})
        print(f"note: {out / 'compare'} left as it is: no run directory in {runs_dir} for "
              f"{', '.join(missing)}", file=sys.stderr)
        return
    try:
        compare.compare_runs(dirs, out / "compare")
    except compare.CompareError as e:
        print(f"warning: compare_flops: {e}", file=sys.stderr)


@dataclasses.dataclass
class StudyOptions:
    """What ``tools/reproduce_study.py``'s flags choose (its ``--help`` says what each does)."""

    budget: float = 1.0
    threads: int = 1
    out: Path = Path("benchmarks/results/reproduce_small")
    runs_dir: Path = Path("runs/reproduce_small")
    data_dir: Path | None = None
    docs_dir: Path = Path("docs")
    vocab_size: int = 2048
    only: list[str] | None = None
    force: bool = False
    dry_run: bool = False
    analyze_only: bool = False


def run_study(args: StudyOptions) -> int:
    """Every step of the study (module docstring), each skipped when its output exists."""
    iters = iterations(args.budget)
    out = args.out if args.out.is_absolute() else REPO / args.out
    docs = args.docs_dir if args.docs_dir.is_absolute() else REPO / args.docs_dir
    runs_dir = args.runs_dir if args.runs_dir.is_absolute() else REPO / args.runs_dir
    data_dir = args.data_dir or Path(f"data_cache/reproduce_small_v{args.vocab_size}")
    data_abs = data_dir if data_dir.is_absolute() else REPO / data_dir
    t_start = time.time()
    os.chdir(REPO)  # the plan's paths (data, runs, tokenizer) are relative to the repository
    results = load_results(out) if (out / "runs").is_dir() else {}
    deep = results.get("vanilla_deep", {}).get("num_layers")
    plan = study_plan(iters, str(data_dir), str(args.runs_dir), deep)
    if args.dry_run:
        later = "" if deep is not None else " (+ vanilla_deep once adaptive_s1 is done)"
        print(f"{len(plan)} runs of {iters} iterations x {BATCH} x {SEQ} tokens{later}:")
        for s in plan:
            state = "done" if finished(out, s) else "to do"
            print(f"  [{state}] {s.name}: {s.config} {' '.join(s.args())}")
        return 0
    if not args.analyze_only:
        torch_threads(args.threads)
        prepare_data(data_abs, args.vocab_size, args.threads)
        done_names: set[str] = set()
        while True:
            results = load_results(out) if (out / "runs").is_dir() else {}
            if "vanilla_deep" not in {s.name for s in plan} and "adaptive_s1" in results:
                target = results["adaptive_s1"]["train"]["flops_per_token"]
                deep = matched_layers(target, results["adaptive_s1"]["vocab"])
                plan = study_plan(iters, str(data_dir), str(args.runs_dir), deep)
            todo = [s for s in plan if s.name not in done_names
                    and (not args.only or s.name in args.only)]
            if not todo:
                break
            spec = todo[0]
            done_names.add(spec.name)
            if finished(out, spec) and not args.force:
                print(f"== {spec.name}: done ({result_path(out, spec.name)})", flush=True)
                continue
            train(spec, runs_dir, args.threads)
            evaluate(spec, runs_dir / spec.name, out, data_abs)
        results = load_results(out)
    if not results:
        raise StudyError(f"no results in {out / 'runs'}")
    analysis = analyze(results, out)
    meta = {"out": str(args.out), "commit": next(iter(results.values()))["code"].get("commit"),
            "iterations": iters, "seq": SEQ, "batch": BATCH, "vocab_size": args.vocab_size,
            "model": MODEL, "seeds": list(SEEDS), "threads": args.threads,
            "invocation_wall_s": None}
    compare_curves(results, runs_dir, out)
    plots = plot_all(analysis, results, docs)
    meta["invocation_wall_s"] = time.time() - t_start
    (out / "study.json").write_text(json.dumps({"meta": meta, **analysis}, indent=1) + "\n")
    md = render_markdown(analysis, meta)
    (out / "study.md").write_text(md)
    print(md)
    for p in plots:
        print(f"wrote {p}")
    print(f"wrote {out / 'study.json'} and {out / 'study.md'}")
    return 0


def torch_threads(n: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass

