"""Rollouts to training rows: the alignment by hand, and end to end (sampler -> trees -> batch -> step):
with the sampler's log-probs as the behaviour policy the ratio is 1, so the first loss is minus the
token-mean advantage, which shows that one model graph samples and trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnrl_jax.algo import Continuation, Response, build_prompt_trees, prompt_paths
from attnrl_jax.model import ModelConfig, init_params
from attnrl_jax.rl import LossConfig, OptimConfig, init_train_state, make_optimizer, train_step
from attnrl_jax.rl.batch import build_train_batch, paths_to_train_batch
from attnrl_jax.sampling import LoopSettings, SamplingParams, generate


def test_alignment_by_hand():
    batch = build_train_batch(
        [[1, 2, 3]], [[7, 8]], [[0.5, -1.0]], [[-0.1, -0.2]], length=6, pad_id=0, rows=2
    )
    np.testing.assert_array_equal(batch.tokens, [[1, 2, 3, 7, 8, 0], [0] * 6])
    np.testing.assert_array_equal(batch.targets, [[2, 3, 7, 8, 0, 0], [0] * 6])
    np.testing.assert_array_equal(batch.segment_ids, [[1, 1, 1, 1, 1, 0], [0] * 6])
    np.testing.assert_array_equal(batch.loss_mask, [[0, 0, 1, 1, 0, 0], [0] * 6])
    np.testing.assert_allclose(batch.advantages, [[0, 0, 0.5, -1.0, 0, 0], [0] * 6])
    np.testing.assert_allclose(batch.old_logp, [[0, 0, -0.1, -0.2, 0, 0], [0] * 6])
    with pytest.raises(ValueError, match="7 tokens, more than the row length 6"):
        build_train_batch([[1, 2, 3]], [[7, 8, 9, 10]], [[0.0] * 4], [[0.0] * 4], length=6)


@pytest.mark.slow
def test_sampler_trees_batch_step_end_to_end():
    cfg = ModelConfig.tiny(vocab_size=64, remat="none")
    params = init_params(cfg, jax.random.key(0))
    prompt = [5, 6, 7, 8]
    settings = LoopSettings(max_new_tokens=10, sampling=SamplingParams(temperature=1.0), num_steps=8)
    keys = jax.random.split(jax.random.key(1), 3)
    init = generate(
        params,
        jnp.asarray([prompt]),
        jnp.array([4]),
        jnp.zeros(3, jnp.int32),
        jnp.full(3, 4),
        keys,
        jnp.ones(3, bool),
        jnp.full((3, 1), -1),
        jnp.zeros(64, bool),
        jnp.int32(-1),
        cfg=cfg,
        settings=settings,
    )
    init = jax.tree.map(np.asarray, init)
    # Branch response 0 at offsets 3 and 6 with two continuations each, decoded from forked caches.
    r0 = init["tokens"][0]
    src = np.concatenate([prompt, r0[:6]])[None]
    conts = generate(
        params,
        jnp.asarray(src),
        jnp.array([10]),
        jnp.zeros(4, jnp.int32),
        jnp.array([7, 7, 10, 10]),
        jax.random.split(jax.random.key(2), 4),
        jnp.zeros(4, bool),
        jnp.full((4, 1), -1),
        jnp.zeros(64, bool),
        jnp.int32(-1),
        cfg=cfg,
        settings=LoopSettings(max_new_tokens=5),
    )
    conts = jax.tree.map(np.asarray, conts)
    accs = [1.0, 0.0, 1.0, 0.0]  # pretend verdicts
    responses = [
        Response(
            r0,
            init["logprobs"][0],
            1.0,
            tuple(
                Continuation(o, conts["tokens"][k], conts["logprobs"][k], accs[k])
                for k, o in enumerate([3, 3, 6, 6])
            ),
        ),
        Response(init["tokens"][1], init["logprobs"][1], 0.0),
        Response(init["tokens"][2], init["logprobs"][2], 0.0),
    ]
    paths = prompt_paths(0, responses, build_prompt_trees(responses))
    assert len(paths) == 5
    batch = paths_to_train_batch([prompt], paths, length=24, rows=6)
    opt = make_optimizer(OptimConfig(lr=1e-3))
    _, metrics = train_step(
        init_train_state(params, opt),
        batch,
        model_cfg=cfg,
        loss_cfg=LossConfig(kl_coef=0.0),
        optimizer=opt,
        num_microbatches=2,
    )
    mask = np.asarray(batch.loss_mask)
    want = -(np.asarray(batch.advantages) * mask).sum() / mask.sum()
    assert float(metrics["loss"]) == pytest.approx(want, abs=1e-5)
    assert float(metrics["ratio"]) == pytest.approx(1.0, abs=1e-5)  # the sampler's log-probs are the model's
    assert float(metrics["clip_frac"]) == 0.0
