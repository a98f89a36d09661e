"""Evaluation on verl-format benchmarks (docs/algorithm.md section 13): k samples per problem, avg@k (Pass@1,
the mean accuracy over the k samples) and pass@k per benchmark, and their unweighted mean over benchmarks.

`evaluate` is a pure loop over a sampler and a verifier; `load_policy` opens any checkpoint the project
writes (a Hugging Face directory, or a training run's Orbax checkpoints); `eval.py` is the CLI.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from tqdm import tqdm

from attnrl_jax.checkpoint import Checkpointer
from attnrl_jax.data import Problem
from attnrl_jax.mesh import Sharder
from attnrl_jax.model import ModelConfig, param_axes
from attnrl_jax.model.hf_io import load_checkpoint, load_tokenizer
from attnrl_jax.settings import MODEL_OVERRIDES

PAPER_K = {"aime24": 32, "aime25": 32, "amc23": 32, "math500": 4, "minerva": 4, "olympiad": 4}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(accs: np.ndarray) -> dict[str, float]:
    """Metrics of a [problems, k] 0/1 array: avg@k (mean accuracy) and pass@k (any sample correct)."""
    accs = np.asarray(accs, np.float64)
    p, k = accs.shape
    if p == 0:
        return {"problems": 0, "k": k, "avg@k": float("nan"), "pass@k": float("nan")}
    correct = accs.sum(axis=1).astype(int)
    return {
        "problems": int(p),
        "k": int(k),
        "avg@k": float(accs.mean()),
        "pass@k": float(np.mean([pass_at_k(k, int(c), k) for c in correct])),
        "correct": [int(c) for c in correct],  # per problem, of k: what the intervals are computed from
    }


def interval95(result: dict, metric: str) -> tuple[float, float]:
    """The 95% half-width of a benchmark result's avg@k or pass@k over its problems (the unit that was
    sampled; the k samples of one problem are not independent): 1.96 standard errors of the mean of the
    per-problem values (their accuracy c/k, or pass@k), from `result["correct"]`. Returns (value,
    half-width); the half-width is nan without per-problem counts (results of an older version) or with
    fewer than two problems."""
    value, correct, k = result[metric], result.get("correct"), result["k"]
    if not correct or len(correct) < 2:
        return value, float("nan")
    c = np.asarray(correct, np.float64)
    per = c / k if metric == "avg@k" else np.asarray([pass_at_k(k, int(x), k) for x in c])
    return value, float(1.96 * per.std(ddof=1) / np.sqrt(len(per)))


def mean_interval95(results: dict, metric: str) -> tuple[float, float]:
    """The unweighted mean over benchmarks (section 13's "Avg.") and its 95% half-width (the benchmarks'
    standard errors combined as independent)."""
    parts = [interval95(r, metric) for r in results["benchmarks"].values() if r["problems"]]
    if not parts:
        return float("nan"), float("nan")
    half = float(np.sqrt(sum((h / 1.96) ** 2 for _, h in parts)) / len(parts) * 1.96)
    return float(np.mean([v for v, _ in parts])), half


def paper_k(name: str, default: int = 4) -> int:
    """Section 13's samples per problem for a benchmark file name (aime24 -> 32, math500 -> 4, ...)."""
    for key, k in PAPER_K.items():
        if name.lower().startswith(key):
            return k
    return default


def evaluate(
    generate: Callable[[list[Problem], int, int], list[list[str]]],
    score: Callable[[list[str], list], list],
    benchmarks: Mapping[str, Sequence[Problem]],
    k: Mapping[str, int],
    *,
    seed: int = 0,
    batch_prompts: int = 64,
    progress: bool = True,
) -> dict:
    """Samples k[name] responses per problem of each benchmark and scores them.

    Args:
      generate: (problems, n, seed) -> n response texts per problem.
      score: the verifier, (texts, ground_truths) -> 0/1 accuracies (or Verdicts).
      benchmarks: name -> problems.
      k: name -> samples per problem.
      seed: sampling seed (each chunk of prompts gets its own).
      batch_prompts: prompts per sampler call.

    Returns:
      {"benchmarks": {name: {problems, k, avg@k, pass@k}}, "mean": {avg@k, pass@k}} where "mean" is the
      unweighted mean over benchmarks (section 13's "Avg.").
    """
    results = {}
    chunks = [(n, i) for n, ps in benchmarks.items() for i in range(0, len(ps), batch_prompts)]
    bar = tqdm(total=len(chunks), desc="eval", unit="batch", disable=not progress)
    for name, problems in benchmarks.items():
        rows = []
        for i in range(0, len(problems), batch_prompts):
            chunk = list(problems[i : i + batch_prompts])
            texts = generate(chunk, k[name], seed * 1_000_003 + len(results) * 10_007 + i)
            flat = [t for group in texts for t in group]
            gts = [p.ground_truth for p in chunk for _ in range(k[name])]
            verdicts = score(flat, gts)
            rows.append(
                np.asarray([getattr(v, "acc", v) for v in verdicts], np.float64).reshape(len(chunk), -1)
            )
            bar.update(1)
        accs = np.concatenate(rows) if rows else np.zeros((0, k[name]))
        results[name] = summarize(accs)
    bar.close()
    names = [n for n in results if results[n]["problems"]]
    mean = {
        m: float(np.mean([results[n][m] for n in names])) if names else float("nan")
        for m in ("avg@k", "pass@k")
    }
    return {"benchmarks": results, "mean": mean}


def markdown_table(results: dict) -> str:
    """The results as a Markdown table: one row per benchmark, then the unweighted mean."""
    lines = ["| benchmark | problems | k | avg@k (%) | pass@k (%) |", "|---|---:|---:|---:|---:|"]
    for name, r in results["benchmarks"].items():
        lines.append(
            f"| {name} | {r['problems']} | {r['k']} | {100 * r['avg@k']:.1f} | {100 * r['pass@k']:.1f} |"
        )
    m = results["mean"]
    lines.append(f"| **mean (unweighted)** | | | {100 * m['avg@k']:.1f} | {100 * m['pass@k']:.1f} |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, path_prefix: str) -> None:
    """`<prefix>.json` and `<prefix>.md`, each written to a temporary file and renamed into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path_prefix)), exist_ok=True)
    for suffix, text in ((".json", json.dumps(results, indent=2)), (".md", markdown_table(results))):
        tmp = path_prefix + suffix + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path_prefix + suffix)


def load_policy(path: str, sharder=None, **overrides):
    """(cfg, params, tokenizer) from a Hugging Face directory (config.json + safetensors [+ tokenizer]) or
    from a training run's directory (its latest Orbax checkpoint, with the model and tokenizer named by the
    config saved in that checkpoint)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return load_checkpoint(path, sharder, **overrides)
    ckpt_dir = os.path.join(path, "ckpt")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(
            f"{path}: not a checkpoint (expected a Hugging Face directory with config.json, or a training "
            f"run directory with ckpt/)"
        )
    ckpt = Checkpointer(ckpt_dir)
    params, meta, step = ckpt.restore_params()
    ckpt.close()
    run = meta["config"]
    model = run["model"]
    settings = {k: overrides.get(k, model.get(k)) for k in MODEL_OVERRIDES if k in overrides or k in model}
    if model["hf_path"]:
        cfg = ModelConfig.from_hf_dir(model["hf_path"], **settings)
    else:
        cfg = ModelConfig.preset(model["preset"], **settings)
    key = (
        f"{ckpt_dir}: config.tokenizer_path" if run["tokenizer_path"] else f"{ckpt_dir}: config.model.hf_path"
    )
    tokenizer = load_tokenizer(run["tokenizer_path"] or model["hf_path"], key)
    sharder = sharder or Sharder()
    params = jax.tree.map(lambda x: np.asarray(x).astype(cfg.param_dtype), params)
    params = jax.device_put(params, sharder.tree_shardings(param_axes(cfg), params))
    print(f"loaded step {step} of {ckpt_dir}")
    return cfg, params, tokenizer
