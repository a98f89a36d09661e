"""Lowering checks for real GPUs and TPUs from any machine, a CPU-only one included.

    python -m attnrl_jax.kernels.lowering                      # every entry point, target and length
    python -m attnrl_jax.kernels.lowering --lengths 8192 --targets cuda "TPU v6e"

Lowering is not compiling (Triton and Mosaic TPU finish on the device), but it runs every Pallas backend's
own checks of shapes, block specs, grids and primitives, and the program's per-platform choice of kernel
form (`kernels/target.py`). For CUDA this lowers with JAX's default Pallas GPU configuration; for a TPU
kind it lowers inside an abstract one-device mesh of that kind (`jax._src.mesh`, the route ENVIRONMENT.md
describes).

On-chip memory is not checked by lowering (Mosaic TPU and Triton allocate it when compiling on the
device), so `on_chip_bytes` estimates it from the traced kernels themselves, not from a second copy of
their tile arithmetic: TPU, every operand block twice (the pipeline's double buffer) plus the VMEM scratch
plus the four largest values of the kernel body, each padded to the (8 or 16, 128) VMEM tile; GPU, every
tile the kernel loads inside a loop once per pipeline stage, plus those loaded outside loops. The limits:
227 KiB of shared memory per H100/H200 block, 16 MiB of scoped VMEM (the default of v5e, the smallest).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# target name -> (lowering platform, TPU device kind or None)
TARGETS = {
    "cuda": ("cuda", None),
    "TPU v5e": ("tpu", "TPU v5e"),
    "TPU v5p": ("tpu", "TPU v5p"),
    "TPU v6e": ("tpu", "TPU v6e"),
}
LENGTHS = (1024, 8192, 32768)
SMEM_LIMIT = 232_448  # bytes of shared memory per thread block on H100/H200 (227 KiB)
VMEM_LIMIT = 16 << 20  # scoped VMEM default of TPU v5e (v5p: 16 MiB, v6e: 32 MiB)
KERNEL_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
PAGE = 128  # the shipped configs' KV page (config.sampler.page_size)


def lower(fn: Callable, args, target: str) -> str:
    """StableHLO text of jit(fn) lowered for `target` (a key of TARGETS); raises what the backend raises.
    A TPU target is traced inside its abstract mesh too: the TPU kernels read the device kind when traced."""
    platform, kind = TARGETS[target]
    if kind is None:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    from jax._src.mesh import AbstractDevice, AbstractMesh

    device = AbstractDevice(device_kind=kind, num_cores=1, platform="tpu")
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def kernel_names(text: str) -> list[str]:
    """Names of the Pallas kernels in a lowered module (TPU: kernel_name attributes; GPU: one entry per
    Triton call, whose names are inside the serialized IR, so they are counted, not named)."""
    names = re.findall(r'kernel_name = "(\w+)"', text)
    return names or ["triton"] * text.count(KERNEL_CALL["cuda"])


# ------------------------------------------------------------------------------------------------------
# On-chip memory of the traced kernels


def _pallas_calls(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for sub in _subjaxprs(eqn):
            yield from _pallas_calls(sub)


def _subjaxprs(eqn):
    for p in eqn.params.values():
        for sub in p if isinstance(p, (list, tuple)) else [p]:
            if hasattr(sub, "eqns"):
                yield sub
            elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                yield sub.jaxpr


def _form(eqn) -> str | None:
    """ "tpu" / "triton" for a compiled kernel, None for an interpreted one."""
    if eqn.params.get("interpret"):
        return None
    params = eqn.params.get("compiler_params")
    kinds = {type(p).__module__ for p in (params.values() if isinstance(params, dict) else [params]) if p}
    if any("mosaic_gpu" in k for k in kinds):
        return "mosaic_gpu"
    if any("triton" in k for k in kinds):
        return "triton"
    if any("mosaic" in k or "tpu" in k for k in kinds):
        return "tpu"
    return None


def _vmem_bytes(shape, dtype) -> int:
    """Bytes of an array in VMEM: last dim padded to 128 lanes, the one before to 8 (32-bit) sublanes."""
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape) or (1,)
    sub = 8 * max(1, 4 // dtype.itemsize)
    lanes = -(-shape[-1] // 128) * 128
    rows = -(-shape[-2] // sub) * sub if len(shape) > 1 else 1
    return math.prod(shape[:-2]) * rows * lanes * dtype.itemsize


def _body_values(jaxpr):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            if hasattr(v.aval, "shape") and hasattr(v.aval, "dtype"):
                yield eqn, v.aval
        for sub in _subjaxprs(eqn):
            yield from _body_values(sub)


def _loads(jaxpr, in_loop=False):
    """(bytes, inside a loop) of every ref load of a kernel body."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "get":
            aval = eqn.outvars[0].aval
            yield math.prod(aval.shape) * np.dtype(aval.dtype).itemsize, in_loop
        loop = in_loop or eqn.primitive.name in ("while", "scan")
        for sub in _subjaxprs(eqn):
            yield from _loads(sub, loop)


@dataclasses.dataclass(frozen=True)
class KernelMemory:
    name: str
    form: str  # "tpu" or "triton"
    bytes: int
    limit: int

    @property
    def fits(self) -> bool:
        return self.bytes <= self.limit


def on_chip_bytes(fn: Callable, args) -> list[KernelMemory]:
    """Estimated on-chip memory of every compiled Pallas kernel that jit(fn) traces (module docstring)."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    out = []
    for eqn in _pallas_calls(jaxpr):
        form = _form(eqn)
        if form is None:
            continue
        name = str(eqn.params.get("name") or "kernel")
        gm = eqn.params["grid_mapping"]
        body = eqn.params["jaxpr"]
        if form == "tpu":
            blocks = sum(
                _vmem_bytes(bm.transformed_block_aval.shape, bm.array_aval.dtype) for bm in gm.block_mappings
            )
            scratch = [v.aval for v in body.invars[len(body.invars) - gm.num_scratch_operands :]]
            scratch_bytes = sum(_vmem_bytes(a.shape, a.dtype) for a in scratch)
            values = sorted((_vmem_bytes(a.shape, a.dtype) for _, a in _body_values(body)), reverse=True)
            out.append(KernelMemory(name, form, 2 * blocks + scratch_bytes + sum(values[:4]), VMEM_LIMIT))
        else:
            params = eqn.params["compiler_params"]
            params = next(iter(params.values())) if isinstance(params, dict) else params
            stages = getattr(params, "num_stages", None) or 2
            loads = list(_loads(body))
            smem = sum(b * (stages if loop else 1) for b, loop in loads)
            out.append(KernelMemory(name, form, smem, SMEM_LIMIT))
    return out


# ------------------------------------------------------------------------------------------------------
# Entry points at the 1.5B model's shapes


def _model_cfg(layers: int | None = None):
    from attnrl_jax.model.config import ModelConfig

    overrides = {"attention_impl": "pallas", "param_dtype": "bfloat16", "dtype": "bfloat16", "remat": "full"}
    if layers:
        overrides["num_layers"] = layers
    return ModelConfig.preset("r1_distill_qwen_1p5b", **overrides)


def _abstract_params(cfg):
    from attnrl_jax.model.transformer import init_params

    return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def entry_points(length: int, layers: int | None = None) -> dict[str, tuple[Callable, tuple]]:
    """name -> (fn, abstract args) of every kernel and every model entry point that uses one, at the
    1.5B model's shapes (12 query heads, 2 KV heads, head dim 128, bfloat16) and sequence length `length`.
    `layers` shortens the model (the kernels and their shapes do not depend on the layer count)."""
    from attnrl_jax.kernels.decode_attention import decode_attention
    from attnrl_jax.kernels.fci import fci_column_sums
    from attnrl_jax.kernels.flash_attention import flash_attention

    cfg = _model_cfg(layers)
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    bf16, i32, f32 = jnp.bfloat16, jnp.int32, jnp.float32
    q, kv, seg = _sds((1, length, n, h), bf16), _sds((1, length, k, h), bf16), _sds((1, length), i32)

    def attn_grad(q, k, v, s):
        loss = lambda q, k, v: flash_attention(q, k, v, s, s)[0].astype(f32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    decode_rows, buckets, pages = 64, 512, -(-length // PAGE)
    points = {
        "flash attention forward": (lambda q, k, v, s: flash_attention(q, k, v, s, s), (q, kv, kv, seg)),
        "flash attention backward": (attn_grad, (q, kv, kv, seg)),
        "FCI column sums": (
            lambda q, k, lse, s, sl: fci_column_sums(q, k, lse, s, sl),
            (q, kv, _sds((1, n, length), f32), seg, seg),
        ),
        f"decode (B={decode_rows}, R=2, C={buckets}, pages of {PAGE})": (
            lambda q, k, v, table, lens, st: decode_attention(q, k, v, table, lens, st, num_steps=buckets),
            (
                _sds((decode_rows, n, h), bf16),
                _sds((1, decode_rows * pages, PAGE, k * h), jnp.uint16),  # the sampler's pool of raw words
                _sds((1, decode_rows * pages, PAGE, k * h), jnp.uint16),
                _sds((decode_rows, pages), i32),
                _sds((decode_rows,), i32),
                _sds((decode_rows, 2, pages * PAGE), i32),
            ),
        ),
    }
    points.update(_model_points(cfg, length))
    return points


def _model_points(cfg, length):
    import optax

    from attnrl_jax.model.transformer import forward_with_fci
    from attnrl_jax.rl.loss import LossConfig
    from attnrl_jax.rl.train_step import TrainBatch, TrainState, train_step
    from attnrl_jax.sampling.loop import LoopSettings, generate

    params = _abstract_params(cfg)
    i32, f32 = jnp.int32, jnp.float32
    row = _sds((1, length), i32)
    optimizer = optax.adamw(1e-6)
    state = jax.eval_shape(lambda p: TrainState(p, optimizer.init(p), jnp.zeros((), i32)), params)
    batch = TrainBatch(
        row,
        row,
        row,
        _sds((1, length), f32),
        _sds((1, length), f32),
        _sds((1, length), f32),
        _sds((1, length), f32),
    )
    prompt, rows = min(1024, length // 8), 2
    settings = LoopSettings(max_new_tokens=length - prompt, num_steps=512, page_size=PAGE)

    def sample(params, src, lens, keys, seps):
        return generate(
            params,
            src,
            lens,
            jnp.arange(rows) % src.shape[0],
            lens[jnp.arange(rows) % src.shape[0]],
            keys,
            jnp.ones((rows,), bool),
            jnp.full((rows, 1), 2, i32),
            seps,
            jnp.asarray(-1, i32),
            cfg=cfg,
            settings=settings,
        )

    return {
        "forward_with_fci (log-probs)": (
            lambda p, t, s: forward_with_fci(
                p, t, s, jnp.full((1,), -1, i32), cfg=cfg, num_steps=512, targets=t
            ),
            (params, row, row),
        ),
        "train step (loss gradient)": (
            lambda st, b: train_step(
                st, b, model_cfg=cfg, loss_cfg=LossConfig(kl_coef=0.001), optimizer=optimizer
            ),
            (state, batch),
        ),
        f"sampler ({rows} rows, prompt {prompt}, two segmentations)": (
            sample,
            (
                params,
                _sds((1, prompt), i32),
                _sds((1,), i32),
                jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows)),
                _sds((cfg.vocab_size, 2), bool),
            ),
        ),
    }


def check(name: str, fn, args, targets) -> dict[str, tuple[list[str], list[KernelMemory]]]:
    """Lowers one entry point for each target; returns, per target, its kernel names and the on-chip
    estimates of the target's form (both forms come from one trace). Raises if lowering fails or a
    target's program holds no compiled kernel."""
    memory = on_chip_bytes(fn, args)
    out = {}
    for target in targets:
        text = lower(fn, args, target)
        platform = TARGETS[target][0]
        names = kernel_names(text)
        if KERNEL_CALL[platform] not in text or not names:
            raise AssertionError(f"{name}: the {target} lowering holds no compiled Pallas kernel")
        form = "tpu" if platform == "tpu" else "triton"
        out[target] = names, [m for m in memory if m.form == form]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--layers", type=int, default=0, help="model layers (0: the 1.5B model's 28)")
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__}, lowering from {jax.default_backend()}")
    header = f"{'entry point':<48}{'L':>7}  {'target':<9}{'result':<8}{'kernels':>8}"
    print(f"{header}{'max on-chip':>14}{'limit':>10}")
    failures = 0
    for length in args.lengths:
        for name, (fn, fargs) in entry_points(length, args.layers or None).items():
            try:
                results = check(name, fn, fargs, args.targets)
            except Exception as e:  # noqa: BLE001 - reported per row, counted in the exit status
                failures += 1
                print(f"{name:<48}{length:>7}  {'':<9}FAIL    {type(e).__name__}: {str(e)[:200]}")
                continue
            for target, (names, mem) in results.items():
                worst = max(mem, key=lambda m: m.bytes / m.limit)
                ok = "ok" if all(m.fits for m in mem) else "TOO BIG"
                failures += ok != "ok"
                print(
                    f"{name:<48}{length:>7}  {target:<9}{ok:<8}{len(names):>8}"
                    f"{_size(worst.bytes):>14}{_size(worst.limit):>10}"
                )
    return 1 if failures else 0


def _size(b: int) -> str:
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


if __name__ == "__main__":
    sys.exit(main())
