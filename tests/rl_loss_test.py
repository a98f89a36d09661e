"""The policy loss by hand, micro-batching exactness, the NaN guard and the sharded train step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnrl_jax.mesh import MeshConfig, Sharder, make_mesh
from attnrl_jax.model import ModelConfig, init_params
from attnrl_jax.rl.loss import LossConfig, k3_kl, policy_loss
from attnrl_jax.rl.train_step import (
    Microbatching,
    OptimConfig,
    TrainBatch,
    batch_log_probs,
    init_sharded_train_state,
    init_train_state,
    jit_train_step,
    make_optimizer,
    plan_microbatches,
    train_step,
)

NO_KL = LossConfig(kl_coef=0.0)


def _loss(logp, old, adv, mask, cfg=NO_KL, **kw):
    s, d, m = policy_loss(
        jnp.asarray(logp, jnp.float32),
        jnp.asarray(old, jnp.float32),
        jnp.asarray(adv, jnp.float32),
        jnp.asarray(mask, jnp.float32),
        cfg,
        **kw,
    )
    return float(s / d), m


def test_ratio_one_gives_minus_the_token_mean_advantage():
    adv = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1], [1, 0, 0]])
    logp = np.log(np.full((2, 3), 0.3))
    loss, m = _loss(logp, logp, adv, mask)
    assert loss == pytest.approx(-(1 - 2 + 0.5 + 3) / 4)
    assert float(m["clip_frac"]) == 0.0 and float(m["ratio"]) / float(m["tokens"]) == pytest.approx(1.0)


def test_reinforce_is_minus_advantage_times_log_prob_with_the_clipped_gradient_at_ratio_one():
    """-A log pi: (2 * -(-1) + -1 * -(-2)) / 2 = 0 by hand; its gradient equals the clipped objective's where
    the ratio is 1 (on-policy, first mini-batch) and ignores the ratio elsewhere (no clip, no weight)."""
    cfg = LossConfig(kl_coef=0.0, objective="reinforce")
    adv = np.array([[2.0, -1.0]])
    mask = np.ones((1, 2))
    logp = np.array([[-1.0, -2.0]])
    loss, m = _loss(logp, logp, adv, mask, cfg)
    assert loss == pytest.approx((2 * 1 + -1 * 2) / 2) and float(m["clip_frac"]) == 0.0

    def grad(cfg, old):
        f = lambda lp: policy_loss(lp, old, jnp.asarray(adv), jnp.asarray(mask), cfg)[0]  # noqa: E731
        return np.asarray(jax.grad(f)(jnp.asarray(logp)))

    np.testing.assert_allclose(grad(cfg, jnp.asarray(logp)), grad(NO_KL, jnp.asarray(logp)), rtol=1e-6)
    far = jnp.asarray(logp) - 2.0  # ratio e^2: clipped for A > 0, a different gradient
    np.testing.assert_allclose(grad(cfg, far), -adv, rtol=1e-6)
    assert not np.allclose(grad(NO_KL, far), -adv)
    with pytest.raises(ValueError, match="objective"):
        LossConfig(objective="ppo")


@pytest.mark.parametrize(
    "ratio,adv,expected",
    [
        (1.5, 1.0, -1.28),  # clipped above at 1 + 0.28
        (1.28, 1.0, -1.28),  # exactly at the boundary
        (0.5, 1.0, -0.5),  # positive advantage, ratio below: unclipped (max picks -0.5)
        (0.5, -1.0, 0.8),  # negative advantage, ratio below: clipped at 1 - 0.2
        (0.8, -1.0, 0.8),  # boundary
        (2.0, -1.0, 2.0),  # negative advantage, ratio above: unclipped, below the dual cap
        (3.0, -1.0, 3.0),  # at the dual clip cap c = 3
        (5.0, -1.0, 3.0),  # dual clip: min(5, 3)
        (5.0, -2.0, 6.0),  # the cap scales with |A|
    ],
)
def test_clipping_and_dual_clip_by_hand(ratio, adv, expected):
    loss, _ = _loss([[math.log(ratio)]], [[0.0]], [[adv]], [[1]])
    assert loss == pytest.approx(expected, rel=1e-5)


def test_dual_clip_can_be_switched_off():
    loss, _ = _loss([[math.log(5.0)]], [[0.0]], [[-1.0]], [[1]], LossConfig(kl_coef=0.0, dual_clip=0.0))
    assert loss == pytest.approx(5.0, rel=1e-5)


def test_k3_kl_by_hand_and_in_the_loss():
    # p = 0.5, p_ref = 0.25: d = ln(0.25 / 0.5) = -ln 2; k3 = 0.5 + ln 2 - 1 = 0.19315
    assert float(k3_kl(jnp.log(0.5), jnp.log(0.25))) == pytest.approx(0.5 + math.log(2) - 1, rel=1e-5)
    assert float(k3_kl(jnp.log(0.5), jnp.log(0.5))) == 0.0
    logp = np.log([[0.5, 0.5]])
    loss, m = _loss(
        logp,
        logp,
        [[0.0, 0.0]],
        [[1, 1]],
        LossConfig(kl_coef=0.1),
        ref_logp=jnp.log(jnp.array([[0.25, 0.5]])),
    )
    assert loss == pytest.approx(0.1 * (0.5 + math.log(2) - 1) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="kl_coef > 0 needs the reference log-probs"):
        _loss(logp, logp, [[0.0, 0.0]], [[1, 1]], LossConfig(kl_coef=0.1))


def test_masked_tokens_change_nothing():
    base = dict(logp=[[-1.0, -2.0, -0.5]], old=[[-1.1, -1.9, -0.5]], adv=[[0.7, -0.3, 0.0]], mask=[[1, 1, 0]])
    junk = dict(base, logp=[[-1.0, -2.0, 30.0]], old=[[-1.1, -1.9, -40.0]], adv=[[0.7, -0.3, 1e6]])
    assert _loss(**base)[0] == pytest.approx(_loss(**junk)[0])
    g1 = jax.grad(
        lambda lp: policy_loss(
            lp, jnp.array(base["old"]), jnp.array(base["adv"]), jnp.array(base["mask"]), NO_KL
        )[0]
    )(jnp.array(base["logp"]))
    g2 = jax.grad(
        lambda lp: policy_loss(
            lp, jnp.array(junk["old"]), jnp.array(junk["adv"]), jnp.array(junk["mask"]), NO_KL
        )[0]
    )(jnp.array(junk["logp"]))
    np.testing.assert_allclose(g1[0, :2], g2[0, :2]) and np.testing.assert_array_equal(g2[0, 2], 0.0)


def test_seq_mean_token_mean():
    # sequence means: (1 + 3) / 2 = 2 and 5 / 1 = 5 -> loss = -(2 + 5) / 2 at ratio 1
    loss, _ = _loss(
        np.zeros((2, 2)),
        np.zeros((2, 2)),
        [[1.0, 3.0], [5.0, 9.0]],
        [[1, 1], [1, 0]],
        LossConfig(kl_coef=0.0, aggregation="seq_mean_token_mean"),
    )
    assert loss == pytest.approx(-3.5)


CFG = ModelConfig.tiny(vocab_size=48, num_layers=1)


def _batch(seed=0, b=4, t=10):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (b, t))
    mask = np.zeros((b, t))
    for i, (start, end) in enumerate([(3, 10), (2, 4), (5, 9), (1, 10)][:b]):
        mask[i, start:end] = 1  # unequal token counts per row
    return TrainBatch(
        tokens=jnp.asarray(tokens, jnp.int32),
        targets=jnp.asarray(np.roll(tokens, -1, 1), jnp.int32),
        segment_ids=jnp.ones((b, t), jnp.int32),
        loss_mask=jnp.asarray(mask, jnp.float32),
        advantages=jnp.asarray(rng.normal(size=(b, t)), jnp.float32),
        old_logp=jnp.asarray(-4.0 + 0.3 * rng.normal(size=(b, t)), jnp.float32),
        ref_logp=jnp.asarray(-4.0 + 0.3 * rng.normal(size=(b, t)), jnp.float32),
    )


@pytest.mark.slow
def test_micro_batched_step_equals_full_batch_step():
    """Gradients of the exact token-mean: SGD with lr 1 makes the parameter change equal to the gradient
    (Adam would normalise tiny gradient differences into visible ones)."""
    import optax

    params = init_params(CFG, jax.random.key(0))
    opt = optax.sgd(1.0)
    loss_cfg = LossConfig()
    full, m_full = train_step(
        init_train_state(params, opt), _batch(), model_cfg=CFG, loss_cfg=loss_cfg, optimizer=opt
    )
    micro, m_micro = train_step(
        init_train_state(params, opt),
        _batch(),
        model_cfg=CFG,
        loss_cfg=loss_cfg,
        optimizer=opt,
        num_microbatches=2,
    )
    assert float(m_full["loss"]) == pytest.approx(float(m_micro["loss"]), rel=1e-5)
    assert float(m_full["grad_norm"]) == pytest.approx(float(m_micro["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(micro.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert int(full.step) == 1 and float(m_full["finite"]) == 1.0
    assert any(
        float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(params))
    )


def test_non_finite_step_keeps_the_state():
    params = init_params(CFG, jax.random.key(1))
    opt = make_optimizer(OptimConfig(lr=1e-2))
    state = init_train_state(params, opt)
    bad = _batch()
    bad = TrainBatch(**{**bad.__dict__, "advantages": bad.advantages.at[0, 5].set(jnp.nan)})
    new, m = train_step(state, bad, model_cfg=CFG, loss_cfg=LossConfig(), optimizer=opt)
    assert float(m["finite"]) == 0.0 and int(new.step) == 0
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sharded_jitted_step_equals_unsharded():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharder = Sharder(mesh)
    import optax

    params = init_params(CFG, jax.random.key(2))
    # SGD with momentum: optimizer state shaped (and sharded) like the params, linear in the gradients.
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0, momentum=0.9))
    ref, m_ref = train_step(
        init_train_state(params, opt), _batch(), model_cfg=CFG, loss_cfg=LossConfig(), optimizer=opt
    )
    state = init_sharded_train_state(params, opt, sharder, CFG)
    # 4 rows over the mesh's 4-way batch parallelism (data x fsdp): one micro-batch of one row per device.
    step = jit_train_step(CFG, LossConfig(), opt, state, num_microbatches=1, sharder=sharder)
    new, m = step(state, _batch())
    assert new.params["layers"]["q"].sharding.spec == state.params["layers"]["q"].sharding.spec
    assert float(m["loss"]) == pytest.approx(float(m_ref["loss"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    trace = new.opt_state[1][0].trace["layers"]["q"]
    assert trace.sharding.spec == state.params["layers"]["q"].sharding.spec


def test_a_micro_batch_that_does_not_divide_the_mesh_is_refused():
    """2-row micro-batches on a 4-way batch mesh would be replicated (every device computing every row)."""
    sharder = Sharder(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    params = init_params(CFG, jax.random.key(2))
    opt = make_optimizer(OptimConfig())
    state = init_sharded_train_state(params, opt, sharder, CFG)
    step = jit_train_step(CFG, LossConfig(), opt, state, num_microbatches=2, sharder=sharder)
    with pytest.raises(ValueError, match="micro-batches of 2 rows .* do not divide the mesh's 4-way batch"):
        step(state, _batch())


@pytest.mark.parametrize(
    "rows,per_device,dp,want",
    [
        (192, 3, 8, Microbatching(192, 24, 8)),  # the paper's mini-batch on one 8-chip host
        (192, 3, 32, Microbatching(192, 96, 2)),  # a 32-chip slice: same rows per device, fewer steps
        (192, 3, 128, Microbatching(192, 256, 1)),  # 1.5 rows per device: padded to 2, one micro-batch
        (192, 0, 8, Microbatching(192, 192, 1)),  # 0: the whole mini-batch at once
        (20, 1, 8, Microbatching(20, 8, 3)),  # 20 rows -> 3 x 8 = 24 (4 empty rows)
        (5, 4, 1, Microbatching(5, 4, 2)),  # one device: 2 x 4 = 8 (3 empty rows)
    ],
)
def test_plan_microbatches_by_hand(rows, per_device, dp, want):
    plan = plan_microbatches(rows, per_device, dp)
    assert plan == want
    assert plan.padded_rows >= rows and plan.micro_rows % dp == 0
    assert plan.padded_rows - rows < plan.micro_rows  # never a whole empty micro-batch


def test_plan_microbatches_refuses_bad_sizes():
    with pytest.raises(ValueError, match="rows_per_device >= 0"):
        plan_microbatches(192, -1, 8)


def test_batch_log_probs_equal_the_full_formula_in_micro_batches():
    from attnrl_jax.model import forward

    params = init_params(CFG, jax.random.key(4))
    batch = _batch()
    got = batch_log_probs(params, batch, model_cfg=CFG, temperature=0.8, num_microbatches=2)
    logits = forward(params, batch.tokens, cfg=CFG, segment_ids=batch.segment_ids) / 0.8
    want = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch.targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_the_paper_settings_move_most_parameters_in_ten_steps():
    """configs/attnrl_1p5b.py as shipped (dtypes, lr 1e-6, AdamW, clip), on a tiny model shape: float32
    master weights take the 1e-6 steps. The same ten steps with bfloat16 storage move almost nothing."""
    import configs.attnrl_1p5b as paper

    c = paper.get_config()
    model = ModelConfig.tiny(
        param_dtype=c.model.param_dtype, dtype=c.model.dtype, logits_chunk=c.model.logits_chunk
    )
    optim = OptimConfig(lr=c.optim.lr, weight_decay=c.optim.weight_decay, grad_clip=c.optim.grad_clip)
    loss_cfg = LossConfig(c.loss.clip_low, c.loss.clip_high, c.loss.dual_clip, c.loss.kl_coef)

    def moved(cfg):
        opt = make_optimizer(optim)
        start = init_params(cfg, jax.random.key(5))
        state = init_train_state(start, opt)
        step = jax.jit(lambda s, b: train_step(s, b, model_cfg=cfg, loss_cfg=loss_cfg, optimizer=opt))
        for _ in range(10):
            state, _ = step(state, _batch())
        changed = sum(
            int(jnp.sum(a != b)) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(start))
        )
        return changed / sum(x.size for x in jax.tree.leaves(start))

    assert c.model.param_dtype == "float32" and c.model.dtype == "bfloat16" and c.optim.lr == 1e-6
    assert moved(model) > 0.75  # 86% at 2026-12 (bfloat16: 2%)
    assert moved(model.replace(param_dtype="bfloat16")) < 0.2
