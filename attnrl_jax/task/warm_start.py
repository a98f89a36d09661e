"""Supervised warm start: a tiny Qwen2 trained with cross-entropy on reference solutions (the response
tokens only), so that RL starts from partial accuracy instead of from nothing."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from attnrl_jax.data import Problem
from attnrl_jax.model import ModelConfig, forward, init_params
from attnrl_jax.typing import Params


def tiny_task_model(vocab_size: int, eos_token_id: int | None = None) -> ModelConfig:
    """The policy of the built-in task: 2 layers, width 128, GQA 4/2 (about 0.5M parameters)."""
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        remat="none",
        eos_token_id=eos_token_id,
    )


def encode_examples(tokenizer, problems: Sequence[Problem], solutions: Sequence[str], max_length: int):
    """Right-padded tokens [N, T] and a 0/1 mask of the response tokens (the loss positions), with T the
    longest example rounded up to a multiple of 8 (at most `max_length`; longer examples are cut)."""
    rows, starts = [], []
    for p, s in zip(problems, solutions):
        prompt = tokenizer.apply_chat_template(list(p.messages), add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        response = tokenizer.encode(s, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append((prompt + response)[:max_length])
        starts.append(len(prompt))
    length = min(max_length, -(-max(len(r) for r in rows) // 8) * 8)
    tokens = np.full((len(rows), length), tokenizer.pad_token_id, np.int32)
    loss = np.zeros((len(rows), length), np.float32)
    for i, (row, start) in enumerate(zip(rows, starts)):
        tokens[i, : len(row)] = row
        loss[i, start : len(row)] = 1.0
    return tokens, loss


def warm_start(
    cfg: ModelConfig,
    tokens: np.ndarray,
    loss_mask: np.ndarray,
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    holdout: tuple[np.ndarray, np.ndarray] | None = None,
    target: float | None = None,
    check_every: int = 100,
) -> tuple[Params, list[float]]:
    """Trains from a random init for at most `steps` Adam steps on random batches; returns (params, losses).

    With `holdout` (tokens, loss mask) and `target`, every `check_every` steps it measures the held-out
    exact-match rate (every response token is the argmax) and stops once it reaches `target`: these small
    models learn the task abruptly, so a step count alone lands anywhere between 10% and 99%, while the
    held-out check stops at the partial accuracy RL should start from.
    """
    params = init_params(cfg, jax.random.key(seed))
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 10 + 1), steps), 0.01)
    opt_state = opt.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tok, mask):
        def loss_fn(p):
            # Right padding needs no mask here: causal attention keeps it out of the loss positions.
            logits = forward(p, tok[:, :-1], cfg=cfg, segment_ids=jnp.ones_like(tok[:, :-1]))
            logp = jax.nn.log_softmax(logits, axis=-1)
            nll = -jnp.take_along_axis(logp, tok[:, 1:, None], axis=-1)[..., 0]
            m = mask[:, 1:]
            return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # Length buckets (multiples of 16): each batch comes from one bucket and is cut to its length, so short
    # examples do not pay for the longest one; a few shapes, a few compilations.
    lengths = np.array([np.flatnonzero(m)[-1] + 1 if m.any() else 1 for m in loss_mask])
    cut = np.minimum(-(-lengths // 16) * 16, tokens.shape[1])
    buckets = [np.flatnonzero(cut == c) for c in np.unique(cut)]
    weights = np.array([len(b) for b in buckets], np.float64) / len(tokens)

    @jax.jit
    def exact_match(params, tok, mask):
        logits = forward(params, tok[:, :-1], cfg=cfg, segment_ids=jnp.ones_like(tok[:, :-1]))
        wrong = (jnp.argmax(logits, axis=-1) != tok[:, 1:]) & (mask[:, 1:] > 0)
        return jnp.mean(~jnp.any(wrong, axis=-1))

    rng = np.random.default_rng(seed)
    losses = []
    for _ in tqdm(range(steps), desc="warm start", unit="step", disable=not progress):
        idx = rng.choice(buckets[rng.choice(len(buckets), p=weights)], batch_size)
        length = int(cut[idx[0]])
        params, opt_state, loss = step(
            params, opt_state, jnp.asarray(tokens[idx, :length]), jnp.asarray(loss_mask[idx, :length])
        )
        losses.append(loss)
        if holdout is not None and target is not None and len(losses) % check_every == 0:
            rate = float(exact_match(params, jnp.asarray(holdout[0]), jnp.asarray(holdout[1])))
            if rate >= target:
                print(
                    f"warm start: held-out exact match {rate:.2f} >= {target} at step {len(losses)}",
                    flush=True,
                )
                break
    return params, [float(x) for x in jax.device_get(losses)]
