"""The evaluation job behind `eval.py`: load a checkpoint, sample k responses per benchmark problem, score
them with the verifier, write avg@k / pass@k per benchmark and their mean as JSON and Markdown."""

from __future__ import annotations

import glob
import os

import jax
from ml_collections import ConfigDict, config_dict

from attnrl_jax.data import read_verl_parquet
from attnrl_jax.evaluation import evaluate, load_policy, markdown_table, paper_k, write_results
from attnrl_jax.memory import cache_gib, check_memory_settings, device_capacity, resident_bytes
from attnrl_jax.mesh import MeshConfig, Sharder, make_mesh
from attnrl_jax.model.hf_io import load_tokenizer
from attnrl_jax.rewards import VerifierPool
from attnrl_jax.sampling import Sampler
from attnrl_jax.sampling.loop import check_page_size
from attnrl_jax.settings import eval_loop_settings


def default_config() -> ConfigDict:
    """The evaluation job's settings and their defaults (docs/algorithm.md section 13), what `configs/eval.py`
    gives `eval.py` and what the built-in task's evaluations start from."""
    c = ConfigDict()
    c.job = "eval"
    c.seed = 0  # sampling seed
    c.checkpoint = ""  # set with --checkpoint=DIR (or --config.checkpoint=DIR)
    c.tokenizer_path = ""  # default: the checkpoint's own tokenizer

    c.model = ConfigDict()
    # The checkpoint's architecture, for `eval.py --compile_only=TARGET` when --checkpoint is not on this
    # machine (an evaluation reads it from the checkpoint): r1_distill_qwen_1p5b | r1_distill_qwen_7b.
    c.model.preset = "r1_distill_qwen_1p5b"
    c.model.param_dtype = "bfloat16"  # float32 | bfloat16
    c.model.dtype = "bfloat16"
    c.model.remat = "none"
    c.model.attention_impl = "pallas"  # pallas (GPU/TPU) | xla

    c.mesh = ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    c.eval = ConfigDict()
    c.eval.data = ""  # a directory of verl parquet files, or comma-separated files (required)
    c.eval.k = 0  # samples per problem; 0: section 13's (32 for AIME24/25 and AMC23, 4 for the others)
    c.eval.max_new_tokens = 32768  # the paper's final evaluation length
    c.eval.max_prompt_len = 2048  # longer prompts are skipped and counted
    c.eval.temperature = 0.6
    c.eval.top_p = 1.0
    c.eval.top_k = 0
    c.eval.batch_prompts = 64  # prompts per sampler call
    # Per-chip memory for the decode slots (continuous batching beyond), GiB; unset: memory_fraction of what
    # the chip has left after the parameters (attnrl_jax/memory.py; 12 GiB on a CPU); 0: no limit.
    c.eval.cache_gib = config_dict.placeholder(float)
    c.eval.memory_fraction = 0.8
    c.eval.page_size = 128  # positions per KV-cache page (a power of two of at least 16)
    c.eval.output = ""  # results prefix; default: <checkpoint>/eval/results

    c.reward = ConfigDict()
    c.reward.workers = 0  # verifier processes (0: CPU count)
    c.reward.timeout = 5.0
    return c


def benchmark_files(spec: str, key: str = "config.eval.data") -> dict[str, str]:
    """name -> path from a directory of parquet files or a comma-separated list of files."""
    if not spec:
        raise ValueError(
            f"{key} is empty: give a directory of verl parquet files or comma-separated files (the paper's "
            "benchmarks: AIME24/25, AMC23, MATH-500, Minerva, OlympiadBench; docs/algorithm.md section 13)"
        )
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.parquet")))
        if not paths:
            raise FileNotFoundError(f"config.eval.data={spec!r}: no .parquet file in this directory")
    else:
        paths = [p for p in spec.split(",") if p]
        missing = [p for p in paths if not os.path.isfile(p)]
        if not paths or missing:
            raise FileNotFoundError(f"config.eval.data={spec!r}: no such file(s) {missing or [spec]}")
    return {os.path.splitext(os.path.basename(p))[0]: p for p in paths}


def evaluate_policy(
    sampler: Sampler,
    score,
    benchmarks: dict,
    k: dict,
    max_prompt_len: int,
    *,
    seed: int,
    batch_prompts: int = 64,
    progress: bool = True,
) -> dict:
    """avg@k / pass@k of the sampler's policy on `benchmarks` (name -> problems; prompts longer than
    max_prompt_len tokens are skipped and counted): `evaluation.evaluate`'s results, each benchmark with
    its `skipped_long_prompts`. What `eval.py` and the trainer's held-out evaluations run."""
    kept, skipped = {}, {}
    for name, problems in benchmarks.items():
        kept[name] = [p for p in problems if len(sampler.encode_prompt(p.question)) <= max_prompt_len]
        skipped[name] = len(problems) - len(kept[name])

    def generate(problems, n, seed):
        out = sampler.generate([sampler.encode_prompt(p.question) for p in problems], n=n, seed=seed)
        return [[s.text for s in group] for group in out]

    results = evaluate(generate, score, kept, k, seed=seed, batch_prompts=batch_prompts, progress=progress)
    for name, n in skipped.items():
        results["benchmarks"][name]["skipped_long_prompts"] = n
    return results


def run(c: ConfigDict) -> dict:
    if not c.checkpoint:
        raise ValueError("no checkpoint: pass --checkpoint=DIR (a Hugging Face directory or a training run)")
    if not os.path.exists(c.checkpoint):
        raise FileNotFoundError(f"--checkpoint={c.checkpoint!r}: no such directory")
    for key in ("k", "max_prompt_len", "batch_prompts"):
        if c.eval[key] < (0 if key == "k" else 1):
            raise ValueError(f"config.eval.{key} must be positive, got {c.eval[key]}")
    check_memory_settings(c.eval, "eval")
    check_page_size("config.eval.page_size", c.eval.page_size)
    settings = eval_loop_settings(c)
    files = benchmark_files(c.eval.data)
    benchmarks = {name: read_verl_parquet(path) for name, path in files.items()}
    mesh_cfg = MeshConfig(**c.mesh)
    mesh_cfg.resolve(jax.device_count())
    sharder = Sharder(make_mesh(mesh_cfg))
    overrides = {k: v for k, v in c.model.items() if k != "preset"}  # preset: for --compile_only only
    cfg, params, tokenizer = load_policy(c.checkpoint, sharder, **overrides)
    if c.tokenizer_path or tokenizer is None:
        key = "config.tokenizer_path" if c.tokenizer_path else "--checkpoint"
        tokenizer = load_tokenizer(c.tokenizer_path or c.checkpoint, key)
    budget = cache_gib(c.eval.cache_gib, device_capacity(), resident_bytes(params), c.eval.memory_fraction)
    sampler = Sampler(params, cfg, tokenizer, settings, sharder=sharder, cache_gib=budget)

    with VerifierPool(c.reward.workers or None, c.reward.timeout) as pool:
        k = {name: c.eval.k or paper_k(name) for name in benchmarks}
        results = evaluate_policy(
            sampler,
            pool.score,
            benchmarks,
            k,
            c.eval.max_prompt_len,
            seed=c.seed,
            batch_prompts=c.eval.batch_prompts,
        )
    results["checkpoint"] = os.path.abspath(c.checkpoint)
    results["sampling"] = {
        "temperature": c.eval.temperature,
        "top_p": c.eval.top_p,
        "top_k": c.eval.top_k,
        "max_new_tokens": c.eval.max_new_tokens,
    }
    output = c.eval.output or os.path.join(c.checkpoint, "eval", "results")
    write_results(results, output)
    print(markdown_table(results), end="")
    print(f"wrote {output}.json and {output}.md")
    return results
