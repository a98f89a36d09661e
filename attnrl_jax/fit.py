"""Compile-only fit check: every program a run issues, compiled for a target by that target's own compiler
on a machine without it, with what the run keeps resident beside each program, against the chip's memory.

    python train.py --config=configs/attnrl_1p5b.py --compile_only=v5e-8
    python eval.py --config=configs/eval.py --compile_only=h100-8

(MaxText's `train_compile.py` is the model: libtpu and XLA:GPU compile deviceless, `attnrl_jax/targets.py`.)
The programs, at the config's largest shapes:

* training: the sampler's first call (the first batch's initial responses); its largest later call: the
  one-step off-policy call at the largest adaptive batch (`algo.max_batch` prompts' initial responses and
  every response of as many prompts branched at N points x T continuations, each branch taken late in a
  full-length response: the longest prefixes), or for on-policy runs the initial responses and the
  continuations of `algo.max_batch` prompts apart (GRPO: initial responses only); the reference pass over
  one PPO mini-batch; the train step over one mini-batch;
* evaluation: one sampler call of `eval.batch_prompts` prompts of `eval.max_prompt_len` tokens with
  `eval.k` samples each (0: the largest of section 13, 32), `eval.max_new_tokens` long.

Each sampler call gets the cache budget the run would give it (`memory.cache_gib`, from the target's
capacity and what stays resident, when `cache_gib` is unset). A program's memory per chip is its compiled
arguments, outputs and temporaries (aliased bytes once) plus what the run holds outside its arguments while
it runs, by the rules of `trainer.run`: while sampling, the reference and the train state unless it is on
the host (`train.offload_state`); in the passes, the optimizer state and the step's other mini-batches; in
the update, the reference and the other mini-batches. The table gives per-chip memory, capacity, headroom
and compile time; the verdict names every program that does not compile or does not fit, and the command
then exits 1.

Without the model's checkpoint on disk the architecture comes from `config.model.preset` (the shipped
configs name theirs). Nothing here needs a TPU, a GPU or the network.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from attnrl_jax import targets as tg
from attnrl_jax.memory import GiB, cache_gib, resident_bytes
from attnrl_jax.mesh import MeshConfig, Sharder, make_mesh
from attnrl_jax.model.config import ModelConfig
from attnrl_jax.model.forward import forward_with_fci
from attnrl_jax.model.params import init_params, param_axes, param_shapes
from attnrl_jax.rl.loss import LossConfig
from attnrl_jax.rl.train_step import (
    TrainBatch,
    TrainState,
    abstract_train_state,
    jit_train_step,
    make_optimizer,
    plan_microbatches,
    train_step,
)
from attnrl_jax.sampling.loop import LoopSettings, default_pages, generate
from attnrl_jax.sampling.sampler import page_bytes, plan_rows, slot_bytes
from attnrl_jax.settings import eval_loop_settings, model_config, settings_from_config
from attnrl_jax.trainer import jit_passes

MAX_EVAL_K = 32  # section 13's largest k (AIME24/25, AMC23)


@dataclasses.dataclass(frozen=True)
class Program:
    """One program of a run: a jitted function, abstract arguments (with shardings on the target's mesh),
    the bytes per chip the run keeps outside those arguments while it runs, and a line about its shape."""

    name: str
    fn: Callable
    args: tuple
    resident: int
    shape: str
    floor: int = 0  # what the program cannot do without, per chip (a sampler call: KV pool, weights, FCI)


@dataclasses.dataclass(frozen=True)
class Result:
    program: str
    compiled: int | None  # arguments + outputs + temporaries - aliased, bytes per chip
    resident: int
    capacity: int
    compile_s: float
    error: str | None = None
    floor: int = 0

    @property
    def total(self) -> int | None:
        return None if self.compiled is None else self.compiled + self.resident

    @property
    def fits(self) -> bool:
        return self.error is None and self.total <= self.capacity


def run_config(c: ConfigDict, layers: int | None = None) -> ConfigDict:
    """A copy of `c` whose model is the checkpoint's config.json where it is on this machine, else
    config.model.preset (hf_path cleared); `layers` sets the depth (`config.model.num_layers`)."""
    c = ConfigDict(c.to_dict())
    if not (c.model.get("hf_path") and os.path.isdir(c.model.hf_path)):
        if not c.model.get("preset"):
            raise ValueError(
                f"config.model.hf_path={c.model.get('hf_path', '')!r} is not on this machine and "
                "config.model.preset is empty: set one of them so the fit check knows the architecture"
            )
        c.model.hf_path = ""
    if layers:
        c.model.num_layers = layers
    return c


def _models(c: ConfigDict):
    """(the run's ModelConfig, the one compiled: of `config.model.num_layers` layers when `run_config` set
    it). Sampler calls are planned with the run's (its pages and slots), whatever depth compiles."""

    cfg = model_config(c)
    return cfg, (cfg.replace(num_layers=c.model.num_layers) if "num_layers" in c.model else cfg)


def abstract_params(cfg, sharder, dtype):
    """Abstract parameters in `dtype` with the parameter shardings."""

    return jax.tree.map(
        lambda sh, ax: jax.ShapeDtypeStruct(sh, dtype, sharding=sharder.sharding(ax, sh)),
        param_shapes(cfg),
        param_axes(cfg),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def initial_rows(prompts: int, group: int, prompt_len: int, limit: int):
    """Sources and rows (source, prefix, limit, FCI) of a call that samples `group` initial responses per
    prompt of `prompt_len` tokens."""
    rows = [(i, prompt_len, limit, True) for i in range(prompts) for _ in range(group)]
    return [prompt_len] * prompts, rows


def continuation_rows(responses: int, points: int, per_point: int, prompt_len: int, limit: int, first=0):
    """Sources and rows of `responses` full-length responses, each branched at `points` offsets between
    half and all of it (the longest prefixes ATB can ask for) with `per_point` continuations each (a
    continuation at offset o may add limit - o tokens); source ids start at `first`."""
    offsets = np.linspace(limit // 2, limit - 1, points).astype(int)
    sources, rows = [], []
    for _ in range(responses):
        src = first + len(sources)
        sources.append(prompt_len + int(offsets[-1]))
        rows += [(src, prompt_len + int(o), limit - int(o), False) for o in offsets for _ in range(per_point)]
    return sources, rows


def sampler_call(cfg, loop, sharder, params, sources, rows, budget_gib, plan_cfg=None):
    """The `sampling.loop.generate` call that `Sampler` compiles for `rows` over `sources` under a cache
    budget of `budget_gib` per chip (`sampling.sampler.plan_rows`, with `plan_cfg`'s pages: default `cfg`):
    (its CallShape, generate.lower with the static arguments bound, the abstract arguments)."""

    shape, *_ = plan_rows(
        sources,
        rows,
        cfg=plan_cfg or cfg,
        settings=loop,
        cache_gib=budget_gib,
        parallelism=sharder.batch_parallelism(),
    )

    def array(shape_, dtype, axes):
        return jax.ShapeDtypeStruct(shape_, dtype, sharding=sharder.sharding(axes, shape_))

    b, r = shape.batch, shape.sources
    keys = jax.ShapeDtypeStruct((b,), jax.random.key(0).dtype, sharding=sharder.sharding(("batch",), (b,)))
    args = (
        params,
        array((r, shape.prefix), jnp.int32, (None, None)),
        array((r,), jnp.int32, (None,)),
        array((b,), jnp.int32, ("batch",)),
        array((b,), jnp.int32, ("batch",)),
        keys,
        array((b,), bool, ("batch",)),
        array((b, 1), jnp.int32, ("batch", None)),
        array((cfg.vocab_size, 2), bool, (None, None)),
        jax.ShapeDtypeStruct((), jnp.int32),
        array((b,), jnp.int32, ("batch",)),
    )
    fn = functools.partial(generate.lower, cfg=cfg, settings=loop, sharder=sharder, **shape.loop_args())
    return shape, fn, args


def sampler_program(
    name, cfg, loop, sharder, params, sources, rows, budget_gib, resident, plan_cfg=None
) -> Program:
    """`sampler_call` as a Program, with its floor: the KV page pool, the weights and the FCI state."""

    shape, fn, args = sampler_call(cfg, loop, sharder, params, sources, rows, budget_gib, plan_cfg)
    fci = shape.slots if shape.fci_slots is None else shape.fci_slots
    per_fci = slot_bytes(cfg, loop, shape.cache_size, 2) - slot_bytes(cfg, loop, shape.cache_size, 2, False)
    pages = shape.pages or default_pages(shape.slots, shape.cache_size, loop.page_size, shape.shards)
    floor = pages * page_bytes(cfg, loop) + resident_bytes(params) + fci // shape.shards * per_fci
    detail = (
        f"{len(rows)} rows of {len(sources)} prefixes; {shape.slots} decode slots ({fci} with FCI) and "
        f"{pages} KV pages of {loop.page_size} per chip (cache budget "
        + (f"{budget_gib:.2f} GiB)" if budget_gib else "unlimited: every row at once)")
    )
    return Program(name, fn, args, resident, detail, floor)


def train_programs(c: ConfigDict, sharder, capacity: int) -> tuple[list[Program], str]:
    """The programs of a training run on `sharder`'s mesh (module docstring), and a line of facts."""

    s = settings_from_config(c, num_devices=sharder.mesh.size, check_paths=False)
    full, cfg = _models(c)
    optimizer = make_optimizer(s.optim)
    state = abstract_train_state(cfg, optimizer, sharder)
    compute = abstract_params(cfg, sharder, jnp.dtype(cfg.dtype))  # the sampler's and reference's copy
    ref = compute if s.loss.kl_coef > 0 else None
    offload = bool(c.train.offload_state)
    sampling = resident_bytes(ref, None if offload else state)  # besides the call's own arguments
    budget = cache_gib(
        c.sampler.cache_gib, capacity, sampling + resident_bytes(compute), c.sampler.memory_fraction
    )
    loop, algo = s.loop, s.algo
    m, prompt, g = loop.max_new_tokens, c.data.max_prompt_len, algo.group_size
    most = max(c.algo.max_batch, c.algo.initial_batch) if c.algo.adaptive_batch else c.algo.initial_batch
    points, per = algo.atb.num_points, algo.continuations
    branching = algo.estimator != "grpo"
    call = functools.partial(
        sampler_program, cfg=cfg, loop=loop, sharder=sharder, params=compute, plan_cfg=full
    )

    def sampler(name, sources, rows):
        return call(name, sources=sources, rows=rows, budget_gib=budget, resident=sampling)

    progs = [sampler("sampler: first batch", *initial_rows(c.algo.initial_batch, g, prompt, m))]
    src, rows = initial_rows(most, g, prompt, m)
    if c.train.off_policy and branching:
        more_src, more_rows = continuation_rows(most * g, points, per, prompt, m, first=len(src))
        progs.append(sampler("sampler: off-policy call, largest batch", src + more_src, rows + more_rows))
    else:
        progs.append(sampler("sampler: initial responses, largest batch", src, rows))
        if branching:
            progs.append(
                sampler(
                    "sampler: continuations, largest batch",
                    *continuation_rows(most * g, points, per, prompt, m),
                )
            )
    # The update. A step's mini-batches (about target_paths rows) are all placed before the first pass.
    plan = plan_microbatches(
        c.train.mini_batch_rows or algo.batch_size.target_paths,
        c.train.rows_per_device,
        sharder.batch_parallelism(),
    )
    shape = (plan.padded_rows, c.train.row_length)
    rows_sharding = sharder.sharding(("batch", "length"), shape)
    batch = TrainBatch(
        *(
            jax.ShapeDtypeStruct(shape, dt, sharding=rows_sharding)
            for dt in [jnp.int32] * 3 + [jnp.float32] * 4
        )
    )
    others = resident_bytes(batch) * max(-(-algo.batch_size.target_paths // plan.rows) - 1, 0)
    detail = (
        f"{plan.padded_rows} rows of {c.train.row_length} tokens "
        f"({plan.count} micro-batches of {plan.micro_rows} rows)"
    )
    if ref is not None or c.train.recompute_logprobs:
        passes = jit_passes(
            cfg, s.loss, sharder, ref is not None, bool(c.train.recompute_logprobs), plan.count
        )
        progs.append(
            Program(
                "reference pass, one mini-batch",
                passes.lower,
                (state.params, ref, batch),
                resident_bytes(state.opt_state) + others,
                detail,
            )
        )
    step = jit_train_step(cfg, s.loss, optimizer, state, plan.count, sharder)
    progs.append(
        Program(
            "train step, one mini-batch", step.lower, (state, batch), resident_bytes(ref) + others, detail
        )
    )
    facts = (
        f"{cfg.num_layers} layers, width {cfg.hidden_size}; train state "
        f"{resident_bytes(state) / GiB:.2f} GiB per chip{', on the host while sampling' if offload else ''}; "
        f"sampler cache budget {_budget(budget)}"
    )
    return progs, facts


def eval_programs(c: ConfigDict, sharder, capacity: int) -> tuple[list[Program], str]:
    """The evaluation call of an eval config (module docstring), and a line of facts."""

    full, cfg = _models(c)
    loop = eval_loop_settings(c)
    params = abstract_params(cfg, sharder, jnp.dtype(cfg.param_dtype))
    budget = cache_gib(c.eval.cache_gib, capacity, resident_bytes(params), c.eval.memory_fraction)
    k = c.eval.k or MAX_EVAL_K
    src, rows = initial_rows(c.eval.batch_prompts, k, c.eval.max_prompt_len, loop.max_new_tokens)
    prog = sampler_program("evaluation call", cfg, loop, sharder, params, src, rows, budget, 0, full)
    facts = f"{cfg.num_layers} layers, width {cfg.hidden_size}; sampler cache budget {_budget(budget)}"
    return [prog], facts


def _budget(gib: float) -> str:
    return f"{gib:.2f} GiB per chip" if gib else "unlimited (every row at once)"


def compile_program(p: Program, mesh, capacity: int) -> Result:
    """Compiles one program under `mesh`; the compiler's refusal is the result, not an exception."""

    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh), jax.default_matmul_precision(None):  # the run's precision
            m = p.fn(*p.args).compile().memory_analysis()
    except Exception as e:  # noqa: BLE001 - the compiler's verdict is the result
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        return Result(p.name, None, p.resident, capacity, time.perf_counter() - t0, first[:400], p.floor)
    compiled = (
        m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    )
    return Result(p.name, compiled, p.resident, capacity, time.perf_counter() - t0, None, p.floor)


def table(results: list[Result]) -> str:
    """Markdown: per chip, the program (compiled) and what the run keeps beside it, against capacity; for a
    sampler call also the program against its floor (KV pool + weights + FCI state)."""
    head = "| program | per chip: program + resident | capacity | headroom | program / floor | compile |"
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        cap = f"{r.capacity / GiB:.2f} GiB"
        floor = f"{r.compiled / r.floor:.2f} x {r.floor / GiB:.2f} GiB" if r.floor and r.compiled else "-"
        if r.error:
            lines.append(f"| {r.program} | **does not compile** | {cap} | - | - | {r.compile_s:.0f} s |")
            continue
        mark = "" if r.fits else " **over**"
        lines.append(
            f"| {r.program} | {r.total / GiB:.2f} GiB = {r.compiled / GiB:.2f} + {r.resident / GiB:.2f} "
            f"| {cap} | {(r.capacity - r.total) / GiB:+.2f} GiB{mark} | {floor} | {r.compile_s:.0f} s |"
        )
    return "\n".join(lines)


def check(c: ConfigDict, target_name: str, job: str, layers: int | None = None, out=print) -> int:
    """Compiles every program of the run `c` (`job` "train" or "eval") for `target_name`, prints the table
    and the verdict, and returns 0 when every program compiles and fits, else 1. `layers` compiles a
    shallower model: a quicker check of the programs' structure whose memory is not the run's."""

    target = tg.parse(target_name)
    devices = tg.devices(target)
    capacity = tg.capacity(target)
    c = run_config(c, layers)
    sharder = Sharder(make_mesh(MeshConfig(**c.mesh), list(devices)))
    programs, facts = (train_programs if job == "train" else eval_programs)(c, sharder, capacity)
    kind = devices[0].device_kind
    out(
        f"{target}: {target.chips} x {kind}, {capacity / GiB:.2f} GiB per chip; jax {jax.__version__}; "
        f"{facts}" + (f" (depth {layers}: a structure check, not the run's memory)" if layers else "")
    )
    results = []
    for p in programs:
        out(f"  compiling {p.name}: {p.shape}")
        r = compile_program(p, sharder.mesh, capacity)
        verdict = "does not compile" if r.error else ("fits" if r.fits else "does NOT fit")
        out(
            f"    {verdict}"
            + ("" if r.error else f", {r.total / GiB:.2f} GiB per chip")
            + f" ({r.compile_s:.0f} s)"
        )
        results.append(r)
    out("")
    out(table(results))
    out("")
    bad = [r for r in results if not r.fits]
    for r in bad:
        why = r.error or f"needs {r.total / GiB:.2f} GiB per chip, the chip holds {r.capacity / GiB:.2f}"
        out(f"verdict: {r.program} {'does not compile' if r.error else 'does not fit'} on {target}: {why}")
    if not bad:
        out(f"verdict: every program compiles for {target} and fits, resident state included")
    return 1 if bad else 0


def cli(c: ConfigDict, target: str, job: str, layers: int = 0) -> int:
    """`train.py` / `eval.py --compile_only=TARGET`: `check`, with a missing compiler or a bad target or
    config reported as one error line (exit status 2)."""

    try:
        return check(c, target, job, layers or None)
    except (tg.MissingCompiler, ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def entry_points(length: int, layers: int = 2) -> dict[str, tuple[Callable, tuple]]:
    """name -> (fn, abstract args) of the model's entry points that use the kernels, at the 1.5B model's
    width, heads and vocabulary with `layers` layers, for one chip: the FCI forward (log-probs of one row of
    `length` tokens), the loss gradient (a train step on that row) and one sampler call (2 rows of a prompt
    of length / 8 tokens, both segmentations, the rest of `length` to generate). The kernels and their
    shapes do not depend on the depth."""

    cfg = ModelConfig.preset(
        "r1_distill_qwen_1p5b",
        attention_impl="pallas",
        param_dtype="bfloat16",
        dtype="bfloat16",
        remat="full",
        num_layers=layers,
    )
    sds = jax.ShapeDtypeStruct
    i32, f32 = jnp.int32, jnp.float32
    params = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    row = sds((1, length), i32)
    optimizer = optax.adamw(1e-6)
    state = jax.eval_shape(lambda p: TrainState(p, optimizer.init(p), jnp.zeros((), i32)), params)
    batch = TrainBatch(row, row, row, *(sds((1, length), f32) for _ in range(4)))
    prompt, rows = min(1024, length // 8), 2
    settings = LoopSettings(max_new_tokens=length - prompt, num_steps=512, page_size=128)

    def sample(params, src, lens, keys, seps):
        src_of = jnp.arange(rows) % src.shape[0]
        stop = jnp.full((rows, 1), 2, i32)
        return generate(
            params, src, lens, src_of, lens[src_of], keys, jnp.ones((rows,), bool), stop, seps,
            jnp.asarray(-1, i32), cfg=cfg, settings=settings,
        )  # fmt: skip

    def fci_forward(p, t, s):
        return forward_with_fci(p, t, s, jnp.full((1,), -1, i32), cfg=cfg, num_steps=512, targets=t)

    def loss_gradient(st, b):
        return train_step(st, b, model_cfg=cfg, loss_cfg=LossConfig(kl_coef=0.001), optimizer=optimizer)

    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows))
    sampler_args = (params, sds((1, prompt), i32), sds((1,), i32), keys, sds((cfg.vocab_size, 2), bool))
    return {
        "FCI forward (log-probs)": (fci_forward, (params, row, row)),
        "loss gradient (train step)": (loss_gradient, (state, batch)),
        "sampler call (two segmentations)": (sample, sampler_args),
    }
