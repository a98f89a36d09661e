"""The prepared device check: what only an accelerator can show, in one command sized for under 8 minutes
(its shapes were chosen for that; it has not been timed on a device yet), so that a session lent a GPU
(15 minutes of device time, `benchmarks/RESULTS.md`) spends it on measurement.

    PYTHONUNBUFFERED=1 python -m benchmarks.device_check --out $OUT        # on the GPU machine
    python -m benchmarks.device_check --dry-run                             # the same steps, tiny, on CPU

Steps (each timed and reported; a failing step is recorded and the next one runs):
1. the compiled kernels against their dense references on the device: flash attention forward and
   backward, FCI column sums, the paged decode kernel with the step mass (R = 2 segmentations, C = 512,
   pages of 128, the sampler's staircase of steps) and without it, at the 1.5B model's heads;
2. `benchmarks.kernel_bench` rows: attention forward and backward against cuDNN's and XLA's, FCI's forward
   overhead against cuDNN attention, decode against the HBM roofline;
3. a 1.5B-shaped sampler call (random bfloat16 weights, 28 layers, the shipped FCI settings, 64 rows of a
   1,024-token prompt generating 1,024 tokens) and train step (float32 master weights, AdamW, 8 rows of 9,216
   tokens in one micro-batch), compiled once and timed.

It needs only what the GPU image has (jax, optax, flax, transformers; not ml-collections or math-verify).
Figures go to stdout and, with --out, to device_check.json there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

RESULTS: dict = {"steps": {}}


def _step(name):
    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            print(f"\n== {name}", flush=True)
            try:
                out = fn(*a, **k)
                RESULTS["steps"][name] = {"ok": True, "seconds": time.perf_counter() - t0, "result": out}
            except Exception as e:  # noqa: BLE001 - recorded; the next step runs
                traceback.print_exc()
                RESULTS["steps"][name] = {"ok": False, "seconds": time.perf_counter() - t0, "error": repr(e)}
            print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)

        return run

    return wrap


def _err(a, b):
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@_step("kernels against their references (compiled)")
def kernels(dry: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from attnrl_jax.fci import step_lengths
    from attnrl_jax.kernels.decode_attention import decode_attention, decode_attention_reference
    from attnrl_jax.kernels.fci import fci_column_sums, fci_column_sums_xla
    from attnrl_jax.kernels.flash_attention import attention_reference, flash_attention

    out = {}
    length = 256 if dry else 4096
    n, k, h = 12, 2, 128
    keys = jax.random.split(jax.random.key(0), 6)
    seg = jnp.ones((1, length), jnp.int32)
    for dtype, tol in ((jnp.float32, 2e-3), (jnp.bfloat16, 5e-2)):
        q = jax.random.normal(keys[0], (1, length, n, h), dtype)
        kk = jax.random.normal(keys[1], (1, length, k, h), dtype)
        v = jax.random.normal(keys[2], (1, length, k, h), dtype)
        got, lse = jax.jit(lambda q, kk, v: flash_attention(q, kk, v, seg, seg))(q, kk, v)
        want = attention_reference(q, kk, v, seg, seg)[0]
        out[f"flash forward {jnp.dtype(dtype).name}"] = e = _err(got, want)
        assert e < tol, e

        def loss(q, kk, v, impl):
            return impl(q, kk, v, seg, seg)[0].astype(jnp.float32).sum()

        g = jax.jit(jax.grad(lambda *a: loss(*a, flash_attention), argnums=(0, 1, 2)))(q, kk, v)
        gr = jax.jit(jax.grad(lambda *a: loss(*a, attention_reference), argnums=(0, 1, 2)))(q, kk, v)
        out[f"flash backward {jnp.dtype(dtype).name}"] = e = max(_err(a, b) for a, b in zip(g, gr))
        assert e < 10 * tol, e
        if dtype == jnp.float32:
            sid = jnp.asarray(np.arange(length) // 37, jnp.int32)[None]
            slen = step_lengths(sid)
            got = jax.jit(fci_column_sums)(q, kk, lse, sid, slen)
            want = fci_column_sums_xla(q, kk, lse, sid, slen)
            out["FCI column sums float32"] = e = _err(got, want)
            assert e < 1e-3, e
    # Paged decode: 64 rows over pages of 128 scattered through the pool, the sampler's staircase steps.
    b, page, c = (8, 128, 64) if dry else (64, 128, 512)
    lengths = np.random.default_rng(0).integers(page, length, b)
    mb = length // page
    table = np.random.default_rng(1).permutation(b * mb).reshape(b, mb).astype(np.int32)
    pool_k = jax.random.normal(keys[3], (1, b * mb, page, k * h), jnp.bfloat16)
    pool_v = jax.random.normal(keys[4], (1, b * mb, page, k * h), jnp.bfloat16)
    qd = jax.random.normal(keys[5], (b, n, h), jnp.bfloat16)
    pos = np.arange(mb * page)
    steps = np.stack([np.minimum(pos // 29, 700), np.minimum(pos // 61, 700)])[None].repeat(b, 0)
    args = (qd, pool_k, pool_v, jnp.asarray(table), jnp.asarray(lengths, jnp.int32), jnp.asarray(steps))
    got = jax.jit(lambda *a: decode_attention(*a, num_steps=c))(*args)
    want = decode_attention_reference(*args, num_steps=c)
    out["decode out bfloat16"], out["decode mass (R=2)"] = _err(got[0], want[0]), _err(got[2], want[2])
    assert out["decode mass (R=2)"] < 1e-2 and out["decode out bfloat16"] < 5e-2, out
    plain = jax.jit(decode_attention)(*args[:5])
    out["decode out, no mass"] = _err(plain[0], want[0])
    for name, e in out.items():
        print(f"   {name:<32} max |ours - reference| = {e:.2e}")
    return out


@_step("kernel benchmarks (benchmarks.kernel_bench)")
def benches(dry: bool):
    from benchmarks import kernel_bench as bench

    runs = (
        [["attention", "--seq-len", "256", "--iters", "1"]]
        if dry
        else [
            ["attention", "--seq-len", "4096", "8192", "--dtype", "bfloat16"],
            ["attention-bwd", "--seq-len", "8192", "--dtype", "bfloat16"],
            ["fci-forward", "--seq-len", "8192", "--dtype", "bfloat16"],
            ["decode", "--batch", "256", "--seq-len", "4096", "--dtype", "bfloat16"],
            ["decode", "--batch", "64", "--seq-len", "16384", "--dtype", "bfloat16"],
        ]
    )
    for argv in runs:
        print(f"   python -m benchmarks.kernel_bench {' '.join(argv)}", flush=True)
        bench.main(argv)
    return {"runs": [" ".join(a) for a in runs]}


def _model(dry: bool, dtype: str):
    from attnrl_jax.model.config import ModelConfig

    overrides = dict(attention_impl="pallas", param_dtype=dtype, dtype="bfloat16", remat="full")
    if dry:
        return ModelConfig.preset("tiny", **overrides)
    return ModelConfig.preset("r1_distill_qwen_1p5b", **overrides)


def _timed(fn, *args, repeat=3):
    import jax

    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compiled, min(times)


@_step("1.5B-shaped sampler call (random weights)")
def sampler(dry: bool):
    import jax
    import jax.numpy as jnp

    from attnrl_jax.model.params import init_params
    from attnrl_jax.sampling.loop import LoopSettings, generate

    cfg = _model(dry, "bfloat16")
    params = jax.jit(lambda: init_params(cfg, jax.random.key(0)))()
    prompts, per, prompt, new = (2, 2, 32, 32) if dry else (16, 4, 1024, 1024)
    rows = prompts * per
    settings = LoopSettings(max_new_tokens=new, num_steps=512, page_size=128, delta=4)
    src = jax.random.randint(jax.random.key(1), (prompts, prompt), 3, cfg.vocab_size)
    lens = jnp.full((prompts,), prompt, jnp.int32)
    row_src = jnp.arange(rows) // per
    seps = jnp.zeros((cfg.vocab_size, 2), bool).at[13, 0].set(True).at[198, 1].set(True)

    def call(params, src):
        return generate(
            params, src, lens, row_src, lens[row_src], jax.random.split(jax.random.key(2), rows),
            jnp.ones((rows,), bool), jnp.full((rows, 1), -1, jnp.int32), seps, jnp.int32(-1),
            cfg=cfg, settings=settings,
        )  # fmt: skip

    compiled, secs = _timed(call, params, src, repeat=2)
    out = compiled(params, src)
    tokens = int(jnp.sum(out["lengths"]))
    mem = compiled.memory_analysis()
    result = {
        "rows": rows,
        "prompt": prompt,
        "new_tokens": new,
        "seconds": secs,
        "tokens_per_s": tokens / secs,
        "temp_gib": mem.temp_size_in_bytes / 2**30,
    }
    print(f"   {rows} rows x {new} new tokens after a {prompt}-token prompt, FCI on: {secs:.2f} s, "
          f"{tokens / secs:,.0f} tokens/s, temporaries {result['temp_gib']:.2f} GiB")  # fmt: skip
    return result


@_step("1.5B-shaped train step (random weights)")
def train_step(dry: bool):
    import jax
    import jax.numpy as jnp

    from attnrl_jax.model.params import init_params
    from attnrl_jax.rl.loss import LossConfig
    from attnrl_jax.rl.train_step import OptimConfig, TrainBatch, init_train_state, make_optimizer
    from attnrl_jax.rl.train_step import train_step as step

    cfg = _model(dry, "float32")
    params = jax.jit(lambda: init_params(cfg, jax.random.key(0)))()
    optimizer = make_optimizer(OptimConfig(lr=1e-6))
    state = jax.jit(lambda p: init_train_state(p, optimizer))(params)
    rows, length = (2, 256) if dry else (8, 9216)
    tokens = jax.random.randint(jax.random.key(1), (rows, length), 3, cfg.vocab_size)
    ones = jnp.ones((rows, length), jnp.float32)
    batch = TrainBatch(tokens, tokens, jnp.ones((rows, length), jnp.int32), ones, ones, -ones, -ones)

    def fn(state, batch):
        return step(state, batch, model_cfg=cfg, loss_cfg=LossConfig(kl_coef=0.001), optimizer=optimizer)

    compiled, secs = _timed(fn, state, batch, repeat=2)
    mem = compiled.memory_analysis()
    result = {
        "rows": rows,
        "length": length,
        "seconds": secs,
        "tokens_per_s": rows * length / secs,
        "temp_gib": mem.temp_size_in_bytes / 2**30,
    }
    print(f"   {rows} rows x {length} tokens, forward + backward + AdamW: {secs:.2f} s, "
          f"{rows * length / secs:,.0f} tokens/s, temporaries {result['temp_gib']:.2f} GiB")  # fmt: skip
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="", help="folder for device_check.json")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on whatever JAX has (a CPU)")
    a = ap.parse_args(argv)
    import jax

    RESULTS["device"] = str(jax.devices()[0].device_kind)
    RESULTS["jax"] = jax.__version__
    RESULTS["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"device check on {RESULTS['device']} x {jax.device_count()}, jax {jax.__version__}", flush=True)
    t0 = time.perf_counter()
    for step in (kernels, benches, sampler, train_step):
        step(a.dry_run)
    RESULTS["seconds"] = time.perf_counter() - t0
    failed = [k for k, v in RESULTS["steps"].items() if not v["ok"]]
    print(f"\ndevice check: {len(RESULTS['steps']) - len(failed)} of {len(RESULTS['steps'])} steps passed in "
          f"{RESULTS['seconds']:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "device_check.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
