"""The update: optimizer from config, the train state, and a pure jitted `train_step`.

`train_step(state, batch)` runs the policy over `num_microbatches` slices of the batch under `lax.scan`,
adds up the gradients of the unreduced loss sums and the token counts, and divides once at the end, so the
result is the exact token-mean over the whole batch whatever the micro-batching. A non-finite loss or
gradient norm leaves the state unchanged and reports `finite = 0`, so that the trainer can stop with the
last good state saved.

Memory: no function here holds [rows, length, vocab] logits (`token_log_probs_from_hidden` works in chunks),
a micro-batch's rows are split over the mesh's batch axes and must divide them (`plan_microbatches` pads a
mini-batch with empty rows so that they do; `train_step` refuses a batch that does not, rather than
replicate it), and `batch_log_probs` computes the reference and recomputed log-probs with the same
micro-batches as the update. The parameters may be stored in float32 while the model computes in bfloat16
(the shipped setting): a bfloat16 weight near 0.02 cannot take a 1e-6 step, a float32 one can.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from attnrl_jax.mesh import Sharder
from attnrl_jax.model.config import ModelConfig
from attnrl_jax.model.forward import hidden_states, token_log_probs_from_hidden
from attnrl_jax.model.params import init_params, param_axes
from attnrl_jax.rl.loss import LossConfig, policy_loss
from attnrl_jax.typing import Array, Params


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm gradient clipping (docs/algorithm.md section 11: lr 1e-6 constant, betas (0.9,
    0.999), weight decay 0.01, clip 1.0).

    Attributes:
      schedule: "constant" or "cosine" (decays to 0 over total_steps after the warm-up).
    """

    lr: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"
    total_steps: int = 1000

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule must be constant or cosine, got {self.schedule!r}")
        if self.lr <= 0 or self.grad_clip <= 0 or self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(
                f"optim: lr and grad_clip must be positive, warmup >= 0, total_steps >= 1; got {self}"
            )


def learning_rate(cfg: OptimConfig) -> optax.Schedule:
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    else:
        main = optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps - cfg.warmup_steps, 1))
    if cfg.warmup_steps == 0:
        return main
    warm = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warm, main], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["params", "opt_state", "step"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class TrainState:
    params: Params
    opt_state: optax.OptState
    step: Array


def init_train_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["tokens", "targets", "segment_ids", "loss_mask", "advantages", "old_logp", "ref_logp"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """Packed training sequences [B, T]: the input tokens, the next-token targets, segment ids (0 = padding),
    the 0/1 mask of response tokens that carry loss, per-token advantages, behaviour and reference
    log-probs (ref_logp is ignored when the KL coefficient is 0)."""

    tokens: Array
    targets: Array
    segment_ids: Array
    loss_mask: Array
    advantages: Array
    old_logp: Array
    ref_logp: Array


@dataclasses.dataclass(frozen=True)
class Microbatching:
    """How one optimizer step's mini-batch is laid out: `count` micro-batches of `micro_rows` rows (a
    multiple of the mesh's batch parallelism), `rows` of them real and the rest empty (zero loss weight)."""

    rows: int
    micro_rows: int
    count: int

    @property
    def padded_rows(self) -> int:
        return self.count * self.micro_rows


def plan_microbatches(rows: int, rows_per_device: int, data_parallel: int) -> Microbatching:
    """The micro-batching of a `rows`-row mini-batch on a mesh whose batch axes have `data_parallel` devices.

    Each micro-batch puts at most `rows_per_device` rows on every device (0: the whole mini-batch at once),
    and fewer when the mini-batch is too small to fill them, so padding stays below one row per device per
    micro-batch. The micro-batch rows always divide the mesh: a batch axis is never left replicated.
    """
    if rows < 1 or rows_per_device < 0 or data_parallel < 1:
        raise ValueError(
            f"need rows >= 1, rows_per_device >= 0 and data_parallel >= 1; got {rows}, {rows_per_device}, "
            f"{data_parallel}"
        )
    per_device = -(-rows // data_parallel)  # rows each device needs for the whole mini-batch
    if rows_per_device:
        per_device = min(per_device, rows_per_device)
    micro_rows = per_device * data_parallel
    return Microbatching(rows, micro_rows, -(-rows // micro_rows))


def _microbatches(batch: TrainBatch, n: int, sharder: Sharder | None) -> TrainBatch:
    b = batch.tokens.shape[0]
    if b % n:
        raise ValueError(f"batch of {b} rows does not split into {n} micro-batches")
    dp = (sharder or Sharder()).batch_parallelism()
    if (b // n) % dp:
        raise ValueError(
            f"micro-batches of {b // n} rows ({b} rows / {n}) do not divide the mesh's {dp}-way batch "
            "parallelism, so every device would compute every row: pad the batch (plan_microbatches)"
        )
    return jax.tree.map(lambda x: x.reshape(n, b // n, *x.shape[1:]), batch)


def _policy_log_probs(params, mb: TrainBatch, model_cfg, temperature, with_entropy, sharder):
    """log pi(targets) [b, T] of one micro-batch at the sampling temperature (and the entropies)."""
    h = hidden_states(params, mb.tokens, cfg=model_cfg, segment_ids=mb.segment_ids, sharder=sharder)
    return token_log_probs_from_hidden(
        params,
        h,
        mb.targets,
        cfg=model_cfg,
        temperature=temperature,
        with_entropy=with_entropy,
        sharder=sharder,
    )


def train_step(
    state: TrainState,
    batch: TrainBatch,
    *,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    optimizer: optax.GradientTransformation,
    num_microbatches: int = 1,
    sharder: Sharder | None = None,
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer step on `batch` (module docstring). Returns the new state and scalar metrics."""
    with_entropy = loss_cfg.entropy_coef > 0

    def loss_sums(params, mb: TrainBatch):
        logp, entropy = _policy_log_probs(params, mb, model_cfg, loss_cfg.temperature, with_entropy, sharder)
        loss_sum, denom, metrics = policy_loss(
            logp, mb.old_logp, mb.advantages, mb.loss_mask, loss_cfg, ref_logp=mb.ref_logp, entropy=entropy
        )
        return loss_sum, (denom, metrics)

    value_and_grad = jax.value_and_grad(loss_sums, has_aux=True)

    def one(carry, mb):
        grads, total, denom, metrics = carry
        (loss_sum, (d, m)), g = value_and_grad(state.params, mb)
        grads = jax.tree.map(jnp.add, grads, g)
        metrics = jax.tree.map(jnp.add, metrics, m)
        return (grads, total + loss_sum, denom + d, metrics), None

    mbs = _microbatches(batch, num_microbatches, sharder)
    first = jax.tree.map(lambda x: x[0], mbs)
    metric_shapes = jax.eval_shape(lambda: loss_sums(state.params, first)[1][1])
    init = (
        jax.tree.map(jnp.zeros_like, state.params),
        jnp.zeros((), jnp.float32),
        jnp.zeros((), jnp.float32),
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes),
    )
    (grads, total, denom, msum), _ = jax.lax.scan(one, init, mbs)
    denom = jnp.maximum(denom, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = total / denom
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(params, opt_state, state.step + 1)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    tokens = jnp.maximum(msum["tokens"], 1.0)
    metrics = {k: v / tokens for k, v in msum.items() if k != "tokens"}
    # The step's size relative to the parameters, |delta theta| / |theta|: Adam moves every parameter by
    # about the learning rate whatever the gradient's scale, so this, not the gradient norm, says how far
    # one update moves the policy (and compares a learning rate across model sizes).
    relative = optax.tree.norm(updates) / jnp.maximum(optax.tree.norm(state.params), 1e-12)
    metrics.update(
        loss=loss,
        grad_norm=grad_norm,
        relative_update=jnp.where(finite, relative, 0.0),
        finite=finite.astype(jnp.float32),
        tokens=msum["tokens"],
    )
    return new, metrics


def batch_log_probs(
    params: Params,
    batch: TrainBatch,
    *,
    model_cfg: ModelConfig,
    temperature: float = 1.0,
    num_microbatches: int = 1,
    sharder: Sharder | None = None,
) -> Array:
    """Float32 log-probs [B, T] of the batch's targets under `params` at `temperature`, one micro-batch at a
    time (the update's micro-batches, so the pass needs no more memory than the update's forward): the
    reference log-probs (temperature 1) and the recomputed behaviour log-probs (`recompute_logprobs`)."""
    mbs = _microbatches(batch, num_microbatches, sharder)

    def one(_, mb):
        return None, _policy_log_probs(params, mb, model_cfg, temperature, False, sharder)[0]

    _, logp = jax.lax.scan(one, None, mbs)
    return (sharder or Sharder()).constrain(logp.reshape(batch.tokens.shape), ("batch", "length"))


def jit_train_step(
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    num_microbatches: int = 1,
    sharder: Sharder | None = None,
):
    """`train_step` jitted once, with the shardings of the (already placed) `state` pinned on input and
    output and its buffers donated."""
    fn = functools.partial(
        train_step,
        model_cfg=model_cfg,
        loss_cfg=loss_cfg,
        optimizer=optimizer,
        num_microbatches=num_microbatches,
        sharder=sharder,
    )
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(fn, in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=(0,))


def jit_batch_log_probs(
    model_cfg: ModelConfig, temperature: float, num_microbatches: int = 1, sharder: Sharder | None = None
):
    """`batch_log_probs` jitted once (the trainer calls it on fixed-shape mini-batches, so it compiles
    once per run)."""
    fn = functools.partial(
        batch_log_probs,
        model_cfg=model_cfg,
        temperature=temperature,
        num_microbatches=num_microbatches,
        sharder=sharder,
    )
    return jax.jit(fn)


def _opt_state_shardings(optimizer, abstract_params, param_shardings, sharder: Sharder):
    """The optimizer state's shardings: each moment like the parameter it tracks, the rest replicated."""
    abstract = jax.eval_shape(optimizer.init, abstract_params)
    replicated = sharder.sharding((), ())
    return optax.tree_utils.tree_map_params(
        optimizer, lambda _, s: s, abstract, param_shardings, transform_non_params=lambda _: replicated
    )


def init_sharded_train_state(
    params: Params, optimizer: optax.GradientTransformation, sharder: Sharder, model_cfg: ModelConfig
) -> TrainState:
    """The train state with the optimizer's moments placed like the parameters they track."""
    param_shardings = sharder.tree_shardings(param_axes(model_cfg), params)
    params = jax.device_put(params, param_shardings)
    opt_shardings = _opt_state_shardings(optimizer, params, param_shardings, sharder)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    replicated = sharder.sharding((), ())
    return TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), replicated))


def abstract_train_state(
    model_cfg: ModelConfig, optimizer: optax.GradientTransformation, sharder: Sharder
) -> TrainState:
    """The train state as ShapeDtypeStructs carrying their shardings: what `jit_train_step(...).lower`
    needs to compile (and measure) the update at full scale without allocating it."""

    params = jax.eval_shape(functools.partial(init_params, model_cfg), jax.random.key(0))
    param_shardings = sharder.tree_shardings(param_axes(model_cfg), params)
    opt = jax.eval_shape(optimizer.init, params)
    opt_shardings = _opt_state_shardings(optimizer, params, param_shardings, sharder)

    def spec(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return TrainState(
        jax.tree.map(spec, params, param_shardings),
        jax.tree.map(spec, opt, opt_shardings),
        jax.ShapeDtypeStruct((), jnp.int32, sharding=sharder.sharding((), ())),
    )
