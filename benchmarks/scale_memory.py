"""A fake-CPU PROXY of the per-device memory of the update and the sampler at the paper's shapes, from CPU
XLA's memory analysis (compile only, nothing runs):
`python -m benchmarks.scale_memory [--presets 1p5b,7b] [--devices 8,16,32] [--layers N]`.

This is not a hardware verdict: CPU XLA keeps one layout and updates in place, where the TPU compiler once
kept the KV pool in two layouts (3x these figures), and the kernels compile here in their interpreted form.
What a run needs on a chip comes from the real compilers: `python train.py --config=... --compile_only=v5e-8`
(`attnrl_jax/fit.py`). This proxy stays for what it does show quickly: what a program materialises (full
logits, a replicated batch), for any mesh size.

For each shipped config (configs/attnrl_1p5b.py, configs/attnrl_7b.py) and each mesh size it compiles, on
fake CPU devices, exactly what the trainer runs for one PPO mini-batch: the train step (forward, backward and
AdamW over `train.mini_batch_rows` rows of `train.row_length` tokens, micro-batched by
`train.rows_per_device`) and the log-prob pass that gives the reference (and recomputed) log-probs, with the
shipped dtypes, remat and attention. It prints argument, output, temporary and total bytes per device next to
an analytic lower bound, and which accelerators' memory the proxy total is below.

The lower bound: the float32 parameters, their float32 gradient accumulator and Adam's two moments, split over
every device (FSDP), plus the layer inputs that full rematerialisation keeps for the backward pass (layers x
rows per device x length x width in the compute dtype). Everything above it is XLA's working set: one layer's
recomputed activations, one logits chunk, collectives' buffers. CPU XLA's buffer assignment is not TPU's or
GPU's, but whatever the program materialises (full logits, a replicated batch) shows up here.

`--sampler` measures the sampler instead: one `sampling.loop.generate` call as `Sampler` compiles it for the
shipped config's first batch (algo.initial_batch prompts of data.max_prompt_len tokens, algo.group_size
responses each, sampler.max_new_tokens new tokens, decode slots and KV pages from sampler.cache_gib), and for
an off-policy call that adds N x T continuations of every response of the previous batch (`paper_call`). Its
lower bound is the KV page pool plus the parameters, per device.
"""

from __future__ import annotations

import argparse
import os
import sys

MAX_DEVICES = 32
if "jax" not in sys.modules:  # fake devices must be requested before JAX starts
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={MAX_DEVICES}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import time  # noqa: E402

GiB = 2**30
# Memory per chip of the accelerators people train on (HBM): TPU v5e, v4, H100, v5p.
CHIPS = (("v5e", 16), ("v4", 32), ("H100", 80), ("v5p", 95))
PRESETS = {
    "1p5b": ("configs.attnrl_1p5b", "r1_distill_qwen_1p5b"),
    "7b": ("configs.attnrl_7b", "r1_distill_qwen_7b"),
}


@dataclasses.dataclass(frozen=True)
class Measurement:
    preset: str
    devices: int
    pass_name: str  # "train step" or "log-probs"
    rows: int  # mini-batch rows (real + padding)
    micro_batches: int
    rows_per_device: int  # per micro-batch
    arguments: int  # bytes per device
    outputs: int
    temporaries: int
    aliased: int
    lower_bound: int
    compile_s: float

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries - self.aliased


def shipped_config(preset: str, overrides: dict[str, str] | None = None):
    """The shipped config of `preset` with the model taken from its preset shape (no checkpoint on disk),
    and `overrides` ("train.rows_per_device" -> "2") applied as the command line would."""
    import importlib

    module, model_preset = PRESETS[preset]
    c = importlib.import_module(module).get_config()
    c.model.hf_path = ""
    c.model.preset = model_preset
    for key, text in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        old = node[leaf]
        node[leaf] = type(old)(text) if old is not None and not isinstance(old, bool) else text
    return c


def lower_bound(model_cfg, optim_state_bytes: int, devices: int, rows_per_device: int, length: int) -> int:
    import jax.numpy as jnp

    act = model_cfg.num_layers * rows_per_device * length * model_cfg.hidden_size
    return optim_state_bytes // devices + act * jnp.dtype(model_cfg.dtype).itemsize


def measure(
    preset: str, devices: int, layers: int | None = None, overrides: dict[str, str] | None = None
) -> list[Measurement]:
    """Compiles the train step and the log-prob pass of `preset`'s shipped config on `devices` devices."""
    import jax
    import jax.numpy as jnp

    from attnrl_jax.mesh import MeshConfig, Sharder, make_mesh
    from attnrl_jax.model.params import compute_params
    from attnrl_jax.rl.train_step import (
        TrainBatch,
        abstract_train_state,
        jit_batch_log_probs,
        jit_train_step,
        make_optimizer,
        plan_microbatches,
    )
    from attnrl_jax.settings import settings_from_config

    c = shipped_config(preset, overrides)
    s = settings_from_config(c, num_devices=devices, check_paths=False)
    cfg = s.model if layers is None else s.model.replace(num_layers=layers)
    sharder = Sharder(make_mesh(MeshConfig(**c.mesh), jax.devices()[:devices]))
    optimizer = make_optimizer(s.optim)
    state = abstract_train_state(cfg, optimizer, sharder)
    plan = plan_microbatches(c.train.mini_batch_rows, c.train.rows_per_device, sharder.batch_parallelism())
    shape = (plan.padded_rows, c.train.row_length)

    def array(dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharder.sharding(("batch", "length"), shape))

    batch = TrainBatch(*(array(jnp.int32) for _ in range(3)), *(array(jnp.float32) for _ in range(4)))
    per_device = plan.micro_rows // sharder.batch_parallelism()
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.params, state.opt_state)))
    grad_bytes = sum(x.size * 4 for x in jax.tree.leaves(state.params))
    bound = lower_bound(cfg, state_bytes + grad_bytes, devices, per_device, c.train.row_length)

    out = []
    step_fn = jit_train_step(cfg, s.loss, optimizer, state, plan.count, sharder)
    ref_params = jax.eval_shape(lambda p: compute_params(p, cfg), state.params)
    ref_params = jax.tree.map(
        lambda a, x: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=x.sharding), ref_params, state.params
    )
    logp_fn = jit_batch_log_probs(cfg, 1.0, plan.count, sharder)
    for name, fn, args in (
        ("train step", step_fn, (state, batch)),
        ("log-probs", logp_fn, (ref_params, batch)),
    ):
        t0 = time.perf_counter()
        m = fn.lower(*args).compile().memory_analysis()
        params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(args[0])) // devices
        out.append(
            Measurement(
                preset,
                devices,
                name,
                plan.padded_rows,
                plan.count,
                per_device,
                m.argument_size_in_bytes,
                m.output_size_in_bytes,
                m.temp_size_in_bytes,
                m.alias_size_in_bytes,
                bound if name == "train step" else params_bytes,
                time.perf_counter() - t0,
            )
        )
    return out


@dataclasses.dataclass(frozen=True)
class SamplerMeasurement:
    preset: str
    devices: int
    call: str  # "first batch" or "off-policy"
    rows: int  # rows sampled (before bucketing)
    sources: int  # prefixes prefilled
    slots: int  # decode slots
    fci_slots: int  # of which carry FCI state
    cache_size: int  # KV positions a row can address
    pages: int  # KV pages per device
    page_size: int  # positions per page
    arguments: int  # bytes per device
    outputs: int
    temporaries: int
    aliased: int
    kv_cache: int  # the KV page pool, per device
    compile_s: float

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries - self.aliased


def paper_call(c, call: str) -> tuple[list[int], list[tuple[int, int, int, bool]]]:
    """The prefixes and rows (source, prefix length, token limit, FCI) of one sampler call of config `c`: the
    first batch (algo.initial_batch prompts of data.max_prompt_len tokens, algo.group_size responses
    each), or an off-policy call that adds, for every response of such a batch, ATB's N branch points x T
    continuations, branched late in full-length responses (the rows of `attnrl_jax.fit`, which compiles
    the same calls at the config's largest batch for a real target)."""
    from attnrl_jax.fit import continuation_rows, initial_rows
    from attnrl_jax.settings import algo_config

    m, prompt, g = c.sampler.max_new_tokens, c.data.max_prompt_len, c.algo.group_size
    sources, rows = initial_rows(c.algo.initial_batch, g, prompt, m)
    if call == "off-policy":
        algo = algo_config(c)
        more_src, more_rows = continuation_rows(
            len(rows), algo.atb.num_points, algo.continuations, prompt, m, first=len(sources)
        )
        sources, rows = sources + more_src, rows + more_rows
    elif call != "first batch":
        raise ValueError(f"call must be 'first batch' or 'off-policy', got {call!r}")
    return sources, rows


def measure_sampler(
    preset: str,
    devices: int,
    layers: int | None = None,
    overrides: dict[str, str] | None = None,
    call: str = "first batch",
) -> SamplerMeasurement:
    """Compiles one sampler call of `preset`'s shipped config on `devices` fake devices (module docstring).
    With `layers`, the call keeps the shipped depth's slots and cache size and compiles fewer layers."""
    import jax
    import jax.numpy as jnp

    from attnrl_jax.fit import abstract_params, sampler_call
    from attnrl_jax.memory import cache_gib
    from attnrl_jax.mesh import MeshConfig, Sharder, make_mesh
    from attnrl_jax.settings import settings_from_config

    c = shipped_config(preset, overrides)
    s = settings_from_config(c, num_devices=devices, check_paths=False)
    cfg = s.model if layers is None else s.model.replace(num_layers=layers)
    sharder = Sharder(make_mesh(MeshConfig(**c.mesh), jax.devices()[:devices]))
    source_lens, rows = paper_call(c, call)
    dtype = jnp.dtype(cfg.dtype)  # the sampler reads the compute-dtype copy of the parameters
    # The call the Sampler compiles (attnrl_jax.fit), planned at the shipped depth's slots and pages also
    # when fewer layers compile; an unset cache_gib is the CPU's (memory.CPU_CACHE_GIB): a CPU states none.
    budget = cache_gib(c.sampler.cache_gib, None, 0, c.sampler.memory_fraction)
    params = abstract_params(cfg, sharder, dtype)
    shape, lower, args = sampler_call(cfg, s.loop, sharder, params, source_lens, rows, budget, s.model)
    t0 = time.perf_counter()
    compiled = lower(*args).compile()
    mem = compiled.memory_analysis()
    kv = (
        2 * cfg.num_layers * shape.pages * s.loop.page_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
    )
    return SamplerMeasurement(
        preset,
        devices,
        call,
        len(rows),
        len(source_lens),
        shape.slots,
        shape.slots if shape.fci_slots is None else shape.fci_slots,
        shape.cache_size,
        shape.pages,
        s.loop.page_size,
        mem.argument_size_in_bytes,
        mem.output_size_in_bytes,
        mem.temp_size_in_bytes,
        mem.alias_size_in_bytes,
        kv,
        time.perf_counter() - t0,
    )


def sampler_table(rows: list[SamplerMeasurement]) -> str:
    head = (
        "| model | devices | call | rows (prefixes) | slots (FCI); pages x positions | arguments "
        "| temporaries | total per device | KV pages (bound) | below (proxy only) |"
    )
    lines = [head, "|" + "---|" * 10]
    for m in rows:
        lines.append(
            f"| {m.preset} | {m.devices} | {m.call} | {m.rows} ({m.sources}) "
            f"| {m.slots} ({m.fci_slots}); {m.pages} x {m.page_size} "
            f"| {m.arguments / GiB:.2f} GiB | {m.temporaries / GiB:.2f} GiB | **{m.total / GiB:.2f} GiB** "
            f"| {m.kv_cache / GiB:.2f} GiB | {fits(m.total)} |"
        )
    return "\n".join(lines)


def fits(total: int) -> str:
    """The chips whose memory the proxy total is below (not a fit claim: `train.py --compile_only`)."""
    return ", ".join(name for name, gib in CHIPS if total <= gib * GiB) or "none"


def table(rows: list[Measurement]) -> str:
    head = (
        "| model | devices | pass | rows (micro-batches x rows/device) | arguments | temporaries | total "
        "per device | lower bound | below (proxy only) |"
    )
    lines = [head, "|" + "---|" * 9]
    for m in rows:
        lines.append(
            f"| {m.preset} | {m.devices} | {m.pass_name} "
            f"| {m.rows} ({m.micro_batches} x {m.rows_per_device}) "
            f"| {m.arguments / GiB:.2f} GiB | {m.temporaries / GiB:.2f} GiB | **{m.total / GiB:.2f} GiB** "
            f"| {m.lower_bound / GiB:.2f} GiB | {fits(m.total)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="1p5b,7b")
    p.add_argument("--devices", default="8,16,32")
    p.add_argument("--layers", type=int, default=None, help="override the depth (a quicker, partial check)")
    p.add_argument(
        "--set", action="append", default=[], help="a config override, e.g. train.rows_per_device=2"
    )
    p.add_argument("--sampler", action="store_true", help="measure sampler calls instead of the update")
    a = p.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in a.set)
    import jax

    if a.sampler:
        found = []
        for preset in a.presets.split(","):
            for n in map(int, a.devices.split(",")):
                for call in ("first batch", "off-policy"):
                    m = measure_sampler(preset, n, a.layers, overrides, call)
                    print(
                        f"{preset} x{n} sampler, {call}: {m.total / GiB:.2f} GiB per device "
                        f"(compiled in {m.compile_s:.0f} s)",
                        flush=True,
                    )
                    found.append(m)
        print()
        print(sampler_table(found))
        return 0

    rows = []
    for preset in a.presets.split(","):
        if preset not in PRESETS:
            print(f"error: --presets: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
            return 2
        for n in map(int, a.devices.split(",")):
            if n > jax.device_count():
                print(f"error: --devices {n}: only {jax.device_count()} fake devices (set before JAX starts)")
                return 2
            got = measure(preset, n, a.layers, overrides)
            for m in got:
                print(
                    f"{preset} x{n} {m.pass_name}: {m.total / GiB:.2f} GiB per device "
                    f"(compiled in {m.compile_s:.0f} s)",
                    flush=True,
                )
            rows += got
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
