"""The trainer's rows and reference stages: every mini-batch of every step has one shape whatever the
adaptive batch size (one compile per run), its padding rows carry no loss, and the reference and recomputed
log-probs computed on device equal the plain formula on the real rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.base as base
from attnrl_jax.mesh import Sharder, make_mesh
from attnrl_jax.model import init_params, token_log_probs
from attnrl_jax.rl import build_train_batch, make_optimizer
from attnrl_jax.settings import settings_from_config
from attnrl_jax.trainer import Job, reference_stage, rows_stage


def _job():
    c = base.get_config()
    c.model.preset, c.model.hf_path = "tiny", ""
    c.model.param_dtype = c.model.dtype = "float32"
    c.model.attention_impl = "xla"
    c.train.mini_batch_rows, c.train.rows_per_device, c.train.row_length = 16, 1, 12
    c.data.max_prompt_len = 4
    c.train.recompute_logprobs = True
    s = settings_from_config(c, check_paths=False)
    sharder = Sharder(make_mesh(s.mesh))
    params = init_params(s.model, jax.random.key(0))
    return Job(c, s, sharder, s.model, make_optimizer(s.optim), jax.tree.map(jnp.copy, params)), params


def _batch(rng, n):
    prompts = [list(rng.integers(1, 200, size=3)) for _ in range(n)]
    responses = [list(rng.integers(1, 200, size=int(rng.integers(1, 9)))) for _ in range(n)]
    return build_train_batch(
        prompts,
        responses,
        [np.ones(len(r)) for r in responses],
        [np.full(len(r), -3.0) for r in responses],
        12,
    )


@pytest.mark.slow
def test_every_step_has_one_mini_batch_shape_and_exact_log_probs():
    job, params = _job()
    rng = np.random.default_rng(0)
    for n, want_minibatches in ((20, 2), (37, 3), (5, 1)):  # adaptive batch sizes of three steps
        batch = _batch(rng, n)
        minibatches, plan = rows_stage(job, batch)
        assert (plan.count, plan.micro_rows, plan.padded_rows) == (2, 8, 16)  # 1 row per device, 8 devices
        assert len(minibatches) == want_minibatches
        assert all(mb.tokens.shape == (16, 12) for mb in minibatches)
        out, mismatch = reference_stage(job, params, minibatches, plan)
        ref = np.concatenate([np.asarray(mb.ref_logp) for mb in out])
        old = np.concatenate([np.asarray(mb.old_logp) for mb in out])
        mask = np.concatenate([np.asarray(mb.loss_mask) for mb in out])
        assert not mask[n:].any()  # the padding rows carry no loss
        want = token_log_probs(
            params,
            jnp.asarray(batch.tokens),
            jnp.asarray(batch.targets),
            cfg=job.cfg,
            segment_ids=jnp.asarray(batch.segment_ids),
        )
        real = np.asarray(batch.loss_mask) > 0
        np.testing.assert_allclose(ref[:n][real], np.asarray(want)[real], atol=1e-5)
        np.testing.assert_allclose(old[:n][real], np.asarray(want)[real], atol=1e-5)  # temperature 1
        want_mismatch = np.abs(np.asarray(want) + 3.0)[real].mean()
        assert abs(float(mismatch["logp_mismatch"]) - want_mismatch) < 1e-5
    assert job.passes_fn(plan.count)._cache_size() == 1  # one compile for all three steps
