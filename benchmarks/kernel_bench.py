"""Standalone kernel benchmarks: attention forward and backward, FCI, FCI's forward overhead, decode.

    python -m benchmarks.kernel_bench fci --seq-len 2048 4096 8192
    python -m benchmarks.kernel_bench attention --seq-len 4096
    python -m benchmarks.kernel_bench attention-bwd --seq-len 4096
    python -m benchmarks.kernel_bench fci-forward --seq-len 8192 --dtype bfloat16
    python -m benchmarks.kernel_bench decode --batch 256 --seq-len 4096 --dtype bfloat16

Every row first checks its result against the reference, then times the compiled programs (median of
--iters runs after a warm-up) and reads their temporary memory from the compiled executable's memory
analysis. Ratios are against baselines measured in the same run:

* attention: XLA `jax.nn.dot_product_attention` (and cuDNN's where the backend has it);
* FCI: the dense official-style computation (materialise each layer's attention, step-average it with
  W A W^T, sum the later steps, take the max);
* FCI forward: one layer's attention forward that also yields FCI (flash attention with its log-sum-exp,
  then the FCI kernel and the per-step reduction) against plain attention forward (cuDNN's where the
  backend has it, else XLA's); the ratio is FCI's overhead (target: <= 1.3x cuDNN at L = 8192);
* decode: one layer's decode attention over B rows of a paged cache filled to --seq-len (pages of
  --page positions scattered through the pool), with and without the per-step mass (R = 2
  segmentations, C = --buckets), against the memory roofline: the K/V bytes below the rows' lengths read
  once at the device's HBM bandwidth (--hbm-gbps; known for H100 and H200).

"ours" is the Pallas kernel where a GPU/TPU compiles it; on CPU it is the compiled XLA path (the Pallas
kernels run there only in interpret mode, which is for correctness, not speed).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from attnrl_jax.fci import DELTA, fci_step_sums, step_lengths
from attnrl_jax.kernels.decode_attention import decode_attention, decode_attention_reference
from attnrl_jax.kernels.flash_attention import attention_reference, flash_attention
from attnrl_jax.model.attention import attention, xla_attention


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def _time(compiled, args, iters):
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _mem(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.output_size_in_bytes) if m is not None else -1


def _ours_impl() -> str:
    return "xla" if jax.default_backend() == "cpu" else "pallas"


def _inputs(args, length, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    dt = jnp.dtype(args.dtype)
    b, n, k, h = args.batch, args.heads, args.kv_heads, args.head_dim
    q = jax.random.normal(ks[0], (b, length, n, h), dt)
    kk = jax.random.normal(ks[1], (b, length, k, h), dt)
    v = jax.random.normal(ks[2], (b, length, k, h), dt)
    do = jax.random.normal(ks[3], (b, length, n, h), dt)
    seg = jnp.ones((b, length), jnp.int32)
    return q, kk, v, do, seg


def _dpa(q, k, v, implementation):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def _attention_candidates(impl):

    ours = (
        (lambda q, k, v, s: flash_attention(q, k, v, s, s)[0])
        if impl == "pallas"
        else (lambda q, k, v, s: xla_attention(q, k, v, s, s)[0])
    )
    cands = {
        f"ours ({impl})": ours,
        "jax.nn.dot_product_attention (xla)": lambda q, k, v, s: _dpa(q, k, v, "xla"),
    }
    if jax.default_backend() == "gpu":
        cands["jax.nn.dot_product_attention (cudnn)"] = lambda q, k, v, s: _dpa(q, k, v, "cudnn")
    return cands


def _table(title, rows, baseline):
    print(f"\n{title}")
    print(f"{'shape':<28}{'implementation':<40}{'ms':>10}{'temp MiB':>10}{'time x':>9}{'mem x':>9}")
    for shape, name, secs, mem in rows:
        base = next(r for r in rows if r[0] == shape and r[1] == baseline)
        print(
            f"{shape:<28}{name:<40}{secs * 1e3:>10.2f}{mem / 2**20:>10.1f}"
            f"{base[2] / secs:>8.2f}x{(base[3] / mem if mem > 0 else float('nan')):>8.2f}x"
        )


def _grad_fn(fn, seg, do):
    """(q, k, v) -> (dq, dk, dv) of sum(fn(q, k, v) * do)."""

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * do.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def _attention_rows(args, length, impl, backward):
    q, k, v, do, seg = _inputs(args, length)
    tol = 2e-3 if args.dtype == "float32" else 5e-2
    reference = lambda q, k, v, s: attention_reference(q, k, v, s, s)[0]
    want = (_grad_fn(reference, seg, do) if backward else lambda q, k, v: reference(q, k, v, seg))(q, k, v)
    want = [w.astype(jnp.float32) for w in (want if backward else [want])]
    shape = f"B{args.batch} L{length} N{args.heads}/K{args.kv_heads} H{args.head_dim}"
    rows = []
    for name, fn in _attention_candidates(impl).items():
        run = _grad_fn(fn, seg, do) if backward else functools.partial(fn, s=seg)
        try:
            compiled = _compiled(run, q, k, v)
        except Exception as e:  # noqa: BLE001 - a baseline the backend lacks is skipped, not fatal
            print(f"skipping {name} at L={length}: {type(e).__name__}: {str(e)[:120]}")
            continue
        got = compiled(q, k, v)
        for w, g in zip(want, got if backward else [got]):
            err = float(jnp.abs(g.astype(jnp.float32) - w).max() / (jnp.abs(w).max() + 1e-6))
            assert err <= tol, f"{name} differs from the reference by {err} (relative) at L={length}"
        rows.append((shape, name, _time(compiled, (q, k, v), args.iters), _mem(compiled)))
    return rows


def bench_attention(args, backward: bool):
    impl = _ours_impl()
    rows = [r for length in args.seq_len for r in _attention_rows(args, length, impl, backward)]
    kind = "backward (dq, dk, dv)" if backward else "forward"
    _table(
        f"Attention {kind}, {args.dtype}, {jax.devices()[0].device_kind}",
        rows,
        "jax.nn.dot_product_attention (xla)",
    )


def _random_steps(length, prompt, mean_step, rng):
    ids = [0] * prompt
    c = 1
    while len(ids) < length:
        ids += [c] * int(rng.integers(1, 2 * mean_step))
        c += 1
    return np.asarray(ids[:length], np.int32)


def dense_official_fci(q, k, step_ids, num_steps, delta=DELTA):
    """The official code's approach for one layer: the full causal attention [B, N, L, L], step-averaged
    as W A W^T [B, N, C, C], summed over later steps ([B, N, C]); max over heads."""
    b, length, n, h = q.shape
    kr = jnp.repeat(k, n // k.shape[2], axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, kr, preferred_element_type=jnp.float32) * h**-0.5
    s = jnp.where(jnp.tril(jnp.ones((length, length), bool)), s, -jnp.inf)
    a = jax.nn.softmax(s, axis=-1)
    onehot = jax.nn.one_hot(step_ids, num_steps, dtype=jnp.float32)  # [B, L, C]
    w = onehot / jnp.maximum(onehot.sum(1, keepdims=True), 1.0)  # rows of W, transposed
    step_attn = jnp.einsum("bla,bnlm,bmc->bnac", w, a, w)  # [B, N, C(query step), C(key step)]
    later = jnp.arange(num_steps)[:, None] >= jnp.arange(num_steps)[None, :] + delta
    return jnp.sum(jnp.where(later, step_attn, 0.0), axis=2)  # [B, N, C]


def _fci_rows(args, length, impl, rng):
    q, k, _, _, _ = _inputs(args, length)
    steps = np.stack([_random_steps(length, args.prompt_len, args.mean_step, rng) for _ in range(args.batch)])
    steps = jnp.asarray(steps)
    num_steps = int(steps.max()) + 1
    seg = jnp.ones_like(steps)
    # Ours starts from the log-sum-exp that the attention forward saved anyway.
    lse = (
        flash_attention(q, k, k, seg, seg) if impl == "pallas" else attention_reference(q, k, k, seg, seg)
    )[1]
    dense = _compiled(functools.partial(dense_official_fci, num_steps=num_steps), q, k, steps)
    ours = _compiled(
        lambda q, k, lse, steps: fci_step_sums(q, k, lse, steps, step_lengths(steps), num_steps, impl=impl),
        q,
        k,
        lse,
        steps,
    )
    y_dense, y_ours = dense(q, k, steps), ours(q, k, lse, steps)
    err = float(jnp.abs(y_dense - y_ours).max())
    assert err <= 1e-4 * max(1.0, float(jnp.abs(y_dense).max())), f"FCI differs from the dense one by {err}"
    shape = f"B{args.batch} L{length} S{num_steps} N{args.heads}/K{args.kv_heads}"
    return [
        (shape, DENSE, _time(dense, (q, k, steps), args.iters), _mem(dense)),
        (shape, f"ours ({impl}) from saved lse", _time(ours, (q, k, lse, steps), args.iters), _mem(ours)),
    ]


DENSE = "dense official-style (L x L per head)"


def bench_fci(args):
    impl, rng = _ours_impl(), np.random.default_rng(0)
    rows = [r for length in args.seq_len for r in _fci_rows(args, length, impl, rng)]
    _table(f"FCI of one layer, {args.dtype}, {jax.devices()[0].device_kind}", rows, DENSE)


def bench_fci_forward(args):
    """Attention forward that also yields FCI vs plain attention forward, per layer."""
    impl, rng = _ours_impl(), np.random.default_rng(0)
    baseline = "cudnn" if jax.default_backend() == "gpu" else "xla"
    rows = []
    for length in args.seq_len:
        q, k, v, _, seg = _inputs(args, length)
        steps = np.stack(
            [_random_steps(length, args.prompt_len, args.mean_step, rng) for _ in range(args.batch)]
        )
        steps = jnp.asarray(steps)
        num_steps = int(steps.max()) + 1

        def with_fci(q, k, v, steps, num_steps=num_steps):

            seg = jnp.ones_like(steps)
            out, lse = attention(q, k, v, seg, seg, impl=impl, return_lse=True)
            y = fci_step_sums(q, k, lse, steps, step_lengths(steps), num_steps, impl=impl)
            return out, y

        plain = _compiled(lambda q, k, v: _dpa(q, k, v, baseline), q, k, v)
        ours = _compiled(with_fci, q, k, v, steps)
        ref_out = attention_reference(q, k, v, seg, seg)[0].astype(jnp.float32)
        got_out, y = ours(q, k, v, steps)
        tol = 2e-3 if args.dtype == "float32" else 5e-2
        err = float(jnp.abs(got_out.astype(jnp.float32) - ref_out).max() / (jnp.abs(ref_out).max() + 1e-6))
        assert err <= tol and bool(jnp.isfinite(y).all()), (
            f"attention with FCI differs by {err} at L={length}"
        )
        shape = f"B{args.batch} L{length} S{num_steps} N{args.heads}/K{args.kv_heads}"
        name = f"jax.nn.dot_product_attention ({baseline})"
        rows.append((shape, name, _time(plain, (q, k, v), args.iters), _mem(plain)))
        rows.append(
            (shape, f"ours ({impl}): attention + FCI", _time(ours, (q, k, v, steps), args.iters), _mem(ours))
        )
    _table(f"Attention forward with FCI, {args.dtype}, {jax.devices()[0].device_kind}", rows, name)


HBM_GBPS = {"H100": 3350.0, "H200": 4800.0}  # HBM3 (SXM) and HBM3e peak bandwidths, GB/s


def _hbm_gbps(args) -> float | None:
    if args.hbm_gbps:
        return args.hbm_gbps
    kind = jax.devices()[0].device_kind
    return next((bw for name, bw in HBM_GBPS.items() if name in kind), None)


def bench_decode(args):
    """Decode attention of one layer over a paged cache (pages of `--page` positions scattered through the
    pool, as the sampler's are): rows/s and the fraction of the memory roofline it reaches."""

    impl = _ours_impl()
    dt = jnp.dtype(args.dtype)
    b, n, kv, h, length, page = (
        args.batch,
        args.heads,
        args.kv_heads,
        args.head_dim,
        args.seq_len[0],
        args.page,
    )
    mb = -(-(length + 128) // page)  # a row with room left, as the sampler's
    size = mb * page
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, n, h), dt)
    k = jax.random.normal(ks[1], (1, b * mb, page, kv * h), dt)
    v = jax.random.normal(ks[2], (1, b * mb, page, kv * h), dt)
    table = jax.random.permutation(ks[3], b * mb).reshape(b, mb).astype(jnp.int32)
    lengths = jnp.full((b,), length, jnp.int32)
    steps = jnp.stack([jnp.arange(size) // args.mean_step, jnp.arange(size) // (2 * args.mean_step)])
    steps = jnp.broadcast_to(steps, (b, 2, size)).astype(jnp.int32)
    c = args.buckets
    kernel = decode_attention if impl == "pallas" else decode_attention_reference
    cases = {
        "output only": (lambda q, k, v, t, n_: kernel(q, k, v, t, n_)[:2], (q, k, v, table, lengths)),
        f"output + mass (R=2, C={c})": (
            lambda q, k, v, t, n_, s: (
                kernel(q, k, v, t, n_, s, num_steps=c) if impl == "pallas" else kernel(q, k, v, t, n_, s, c)
            ),
            (q, k, v, table, lengths, steps),
        ),
    }
    want = decode_attention_reference(q, k, v, table, lengths, steps, c)
    bw = _hbm_gbps(args)
    read = 2 * b * length * kv * h * dt.itemsize  # K and V below the rows' lengths
    print(
        f"\nDecode attention of one layer ({impl}), B{b} cache {length}/{size} in pages of {page}, "
        f"N{n}/K{kv} H{h} {args.dtype}, {jax.devices()[0].device_kind}; K/V read per call "
        f"{read / 2**20:.1f} MiB; HBM peak {'unknown (pass --hbm-gbps)' if bw is None else f'{bw:.0f} GB/s'}"
    )
    print(f"{'case':<34}{'ms':>10}{'rows/s':>12}{'GB/s':>10}{'roofline':>10}")
    for name, (fn, fargs) in cases.items():
        compiled = _compiled(fn, *fargs)
        got = compiled(*fargs)
        for w, g in zip(want, got):
            err = float(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)).max())
            assert err <= (1e-3 if args.dtype == "float32" else 5e-2), f"{name} differs by {err}"
        secs = _time(compiled, fargs, args.iters)
        gbps = read / secs / 1e9
        frac = f"{100 * gbps / bw:.0f}%" if bw else "-"
        print(f"{name:<34}{secs * 1e3:>10.3f}{b / secs:>12.0f}{gbps:>10.1f}{frac:>10}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("op", choices=["attention", "attention-bwd", "fci", "fci-forward", "decode"])
    ap.add_argument("--seq-len", type=int, nargs="+", default=[2048])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=200, help="FCI: prompt tokens (step 0)")
    ap.add_argument("--mean-step", type=int, default=40, help="FCI: mean step length in tokens")
    ap.add_argument("--buckets", type=int, default=512, help="decode: FCI step buckets C")
    ap.add_argument("--page", type=int, default=128, help="decode: positions per KV page")
    ap.add_argument("--hbm-gbps", type=float, default=0.0, help="decode: HBM bandwidth (0: by device kind)")
    args = ap.parse_args(argv)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    if args.op == "fci":
        bench_fci(args)
    elif args.op == "fci-forward":
        bench_fci_forward(args)
    elif args.op == "decode":
        bench_decode(args)
    else:
        bench_attention(args, backward=args.op == "attention-bwd")


if __name__ == "__main__":
    main()
