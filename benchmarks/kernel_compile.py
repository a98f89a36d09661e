"""Every Pallas kernel compiled for real targets from any machine, a CPU-only one included, with the
targets' own compilers (`attnrl_jax/targets.py`): Mosaic TPU for TPU v5e and v5p, XLA:GPU's Triton pipeline
for an H100. The compiler's verdict replaces the on-chip estimates this project used to compute by hand
(they said 69 KiB of shared memory for a decode kernel that needed 296.5 KiB).

    python -m benchmarks.kernel_compile                       # every kernel, target and length
    python -m benchmarks.kernel_compile --lengths 8192 --targets h100-1

For the GPU form it also reports registers and spills: the `triton` package (the `cuda` extra) compiles the
TTIR that Pallas emits with the same warps and stages, and ptxas (`ptxas-blackwell`, bundled with it) prints
what the kernel uses on sm_90a. That Triton is the pip package's, not the one inside XLA, so its figures are
those of the same kernel through a sibling compiler; shared memory and the compile itself are XLA's.

Shapes: the 1.5B model's heads (12 query heads, 2 KV heads, head dim 128; the 7B's 28/4 give the same
per-program tiles), bfloat16, the shipped tile settings, L in {1024, 8192, 32768}, and for the paged decode
kernel every (segmentations R, step buckets C, page) the shipped configs use: R = 2 (the "\\n\\n" and "\\n"
segmentations), C = 512 (training), 16 (the built-in tasks), 2 (evaluation), pages of 128 and 16, and the
continuation rows' call without the mass; plus R = 1 and C = 2048, since the GPU form's shared memory does
not depend on R or C any more.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before JAX starts: the targets are compile-only

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attnrl_jax import targets  # noqa: E402
from attnrl_jax.kernels.decode_attention import decode_attention  # noqa: E402
from attnrl_jax.kernels.fci import fci_column_sums  # noqa: E402
from attnrl_jax.kernels.flash_attention import flash_attention  # noqa: E402

LENGTHS = (1024, 8192, 32768)
TARGETS = ("v5e-1", "v5p-2", "h100-1")  # one chip of each: kernels run per device
HEADS, KV_HEADS, HEAD_DIM = 12, 2, 128
DECODE_ROWS = 64
# (segmentations, step buckets, page) of the decode calls the shipped configs make; R = 0: no mass.
DECODE_SETTINGS = ((0, 0, 128), (2, 512, 128), (2, 16, 16), (2, 2, 128), (1, 512, 128), (2, 2048, 128))


def kernel_points(length: int) -> dict[str, tuple[Callable, tuple]]:
    """name -> (fn, abstract args) of every kernel at the 1.5B model's shapes and sequence length."""

    sds = jax.ShapeDtypeStruct
    bf16, i32, f32 = jnp.bfloat16, jnp.int32, jnp.float32
    q = sds((1, length, HEADS, HEAD_DIM), bf16)
    kv = sds((1, length, KV_HEADS, HEAD_DIM), bf16)
    seg = sds((1, length), i32)

    def attn_grad(q, k, v, s):
        loss = lambda q, k, v: flash_attention(q, k, v, s, s)[0].astype(f32).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    points = {
        "flash attention forward": (lambda q, k, v, s: flash_attention(q, k, v, s, s), (q, kv, kv, seg)),
        "flash attention backward": (attn_grad, (q, kv, kv, seg)),
        "FCI column sums": (fci_column_sums, (q, kv, sds((1, HEADS, length), f32), seg, seg)),
    }
    for r, c, page in DECODE_SETTINGS:
        pages = -(-length // page)
        pool = sds((1, DECODE_ROWS * pages, page, KV_HEADS * HEAD_DIM), jnp.uint16)  # raw bfloat16 words
        args = (sds((DECODE_ROWS, HEADS, HEAD_DIM), bf16), pool, pool, sds((DECODE_ROWS, pages), i32))
        args += (sds((DECODE_ROWS,), i32),)
        name = f"decode, pages of {page}, " + (f"R={r} C={c}" if r else "no mass")
        if r:
            steps = sds((DECODE_ROWS, r, pages * page), i32)
            fn = functools.partial(_decode_with_mass, num_steps=c)
            points[name] = (fn, args + (steps,))
        else:
            points[name] = (_decode, args)
    return points


def _decode(q, k, v, table, lengths):

    return decode_attention(q, k, v, table, lengths)


def _decode_with_mass(q, k, v, table, lengths, steps, *, num_steps):

    return decode_attention(q, k, v, table, lengths, steps, num_steps=num_steps)


def single_device(target_name: str, args):
    """(a one-device mesh of the target, `args` placed on it)."""

    device = targets.devices(targets.parse(target_name))[0]
    mesh = jax.sharding.Mesh([device], ("x",))
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return mesh, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), args)


def lower_for(fn: Callable, args, target_name: str):
    """jit(fn) lowered for one chip of `target_name` at the default matmul precision, as a run has it (the
    tests set "highest", which Mosaic refuses for bfloat16 operands)."""
    mesh, placed = single_device(target_name, args)
    with jax.set_mesh(mesh), jax.default_matmul_precision(None):
        return jax.jit(fn).lower(*placed)


def compile_for(fn: Callable, args, target_name: str):
    """jit(fn) compiled for one chip of `target_name` by its real compiler (raises what it raises)."""
    mesh, _ = single_device(target_name, args)
    lowered = lower_for(fn, args, target_name)
    with jax.set_mesh(mesh):
        return lowered.compile()


@dataclasses.dataclass(frozen=True)
class Registers:
    """What ptxas says one Triton kernel uses on sm_90a."""

    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int  # Triton's own shared-memory figure for the kernel
    num_warps: int


def triton_registers(fn: Callable, args) -> list[Registers]:
    """Registers and spills of every Triton kernel that jit(fn) lowers to for CUDA (module docstring).
    Needs the `triton` package."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said without a warning
    import triton
    from jax._src.pallas.triton import lowering as tl
    from triton.backends.compiler import GPUTarget

    captured = []
    original = tl.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = original(*a, **k)
        caller = sys._getframe(1).f_locals  # pallas_call_lowering's num_warps / num_stages
        asm = result.module.operation.get_asm(enable_debug_info=False)
        captured.append(
            (asm, caller.get("num_warps", 4), caller.get("num_stages", 3), caller.get("name", ""))
        )
        return result

    tl.lower_jaxpr_to_triton_module = capture
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        tl.lower_jaxpr_to_triton_module = original
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (asm, warps, stages, name) in enumerate(captured):
            src = os.path.join(tmp, f"k{i}.ttir")
            with open(src, "w") as f:
                f.write(asm)
            compiled = triton.compile(
                src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
            )
            ptx = os.path.join(tmp, f"k{i}.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            run = subprocess.run(
                [ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull], capture_output=True, text=True
            )
            if run.returncode:
                raise RuntimeError(f"ptxas failed on {name}: {run.stderr[-500:]}")
            regs = re.search(r"Used (\d+) registers", run.stderr)
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stderr)
            out.append(
                Registers(
                    name or f"kernel {i}",
                    int(regs.group(1)),
                    int(spills.group(1)),
                    int(spills.group(2)),
                    int(compiled.metadata.shared),
                    warps,
                )
            )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    ap.add_argument("--targets", nargs="+", default=list(TARGETS))
    ap.add_argument("--no-registers", action="store_true", help="skip the ptxas register report")
    a = ap.parse_args(argv)
    print(f"jax {jax.__version__}; compiling for {', '.join(a.targets)} on {jax.default_backend()}")
    print(f"{'kernel':<40}{'L':>7}  {'target':<8}{'result':<10}{'temp':>10}{'s':>6}")
    failures = 0
    for length in a.lengths:
        for name, (fn, args) in kernel_points(length).items():
            for target in a.targets:
                t0 = time.perf_counter()
                try:
                    mem = compile_for(fn, args, target).memory_analysis()
                    result, temp = "ok", f"{mem.temp_size_in_bytes / 2**20:.1f} MiB"
                except Exception as e:  # noqa: BLE001 - reported per row, counted in the exit status
                    failures += 1
                    result, temp = "FAILS", str(e).splitlines()[0][:120]
                took = time.perf_counter() - t0
                print(f"{name:<40}{length:>7}  {target:<8}{result:<10}{temp:>10}{took:>6.1f}")
    if not a.no_registers:
        print(f"\nTriton kernels on sm_90a (ptxas), L = {a.lengths[-1]}:")
        print(f"{'kernel':<40}{'warps':>6}{'registers':>10}{'spill st/ld':>13}{'shared':>10}")
        for name, (fn, args) in kernel_points(a.lengths[-1]).items():
            for r in triton_registers(fn, args):
                failures += bool(r.spill_stores or r.spill_loads)
                print(
                    f"{name + ': ' + r.kernel:<40}{r.num_warps:>6}{r.registers:>10}"
                    f"{f'{r.spill_stores}/{r.spill_loads} B':>13}{r.shared_bytes / 1024:>8.1f} KiB"
                )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
