"""Supervised warm start: a tiny Qwen2 trained with cross-entropy on a fallible teacher's solutions (the
response tokens only; `arith.make_split(slip_rate=...)`), so that RL starts from partial accuracy instead of
from nothing."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from attnrl_jax.data import Problem
from attnrl_jax.model import ModelConfig, forward, init_params, token_log_probs
from attnrl_jax.typing import Params


def tiny_task_model(
    vocab_size: int,
    eos_token_id: int | None = None,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
) -> ModelConfig:
    """The policy of the built-in tasks: `num_layers` layers of width 128 with `num_heads` query and
    `num_kv_heads` KV heads (config.task.model_layers, model_heads, model_kv_heads; about 0.2M parameters
    a layer besides the embedding)."""
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
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


@dataclasses.dataclass
class WarmStartResult:
    params: Params
    losses: list[float]  # training loss of every step
    reached_at: int | None  # the step at which the held-out check first met the target (None: never)
    holdout_match: float  # the held-out exact-match rate of the returned params (nan without a holdout)
    steps: int  # optimizer steps taken


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
    check_every: int = 50,
    warmup: int = 50,
    cooldown: int = 200,
) -> WarmStartResult:
    """Trains from a random init with AdamW on random batches of the examples (right-padded rows).

    The schedule is warmup-stable-decay: `warmup` steps up to `lr`, constant until the held-out check
    (every `check_every` steps: the fraction of `holdout` rows whose every response token is the argmax)
    first reaches `target`, then a linear decay to zero over `cooldown` steps, and stop. Small models learn
    this task after a plateau whose length varies with the seed and the machine's float rounding, so a
    fixed step count or a decaying schedule fixed in advance lands anywhere; a constant rate until the
    model demonstrably has the procedure, then a cool-down that settles its output distribution, does not.
    `steps` caps the total; without a holdout and target it is simply the step count (cool-down included).
    """
    if steps < 1 or batch_size < 1 or check_every < 1:
        raise ValueError(f"steps, batch_size and check_every must be positive, got {steps}, {batch_size}")
    params = init_params(cfg, jax.random.key(seed))
    opt = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.01)
    opt_state = opt.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tok, mask, rate):
        def loss_fn(p):
            # Right padding needs no mask here: causal attention keeps it out of the loss positions.
            nll = -token_log_probs(
                p, tok[:, :-1], tok[:, 1:], cfg=cfg, segment_ids=jnp.ones_like(tok[:, :-1])
            )
            m = mask[:, 1:]
            return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        opt_state.hyperparams["learning_rate"] = rate
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def exact_match(params, tok, mask):
        logits = forward(params, tok[:, :-1], cfg=cfg, segment_ids=jnp.ones_like(tok[:, :-1]))
        wrong = (jnp.argmax(logits, axis=-1) != tok[:, 1:]) & (mask[:, 1:] > 0)
        return jnp.mean(~jnp.any(wrong, axis=-1))

    checking = holdout is not None and target is not None
    held = (jnp.asarray(holdout[0]), jnp.asarray(holdout[1])) if holdout is not None else None
    rng = np.random.default_rng(seed)
    losses, reached_at, decay_from = [], None, None if checking else max(steps - cooldown, warmup)
    bar = tqdm(total=steps, desc="warm start", unit="step", disable=not progress)
    for i in range(steps):
        if decay_from is not None and i >= decay_from + cooldown:
            break
        if i < warmup:
            rate = lr * (i + 1) / warmup
        elif decay_from is None or i < decay_from:
            rate = lr
        else:
            rate = lr * (1.0 - (i - decay_from) / cooldown)
        idx = rng.choice(len(tokens), batch_size)
        params, opt_state, loss = step(
            params, opt_state, jnp.asarray(tokens[idx]), jnp.asarray(loss_mask[idx]), jnp.float32(rate)
        )
        losses.append(loss)
        bar.update()
        if checking and reached_at is None and ((i + 1) % check_every == 0 or i + 1 == steps):
            match = float(exact_match(params, *held))
            bar.set_postfix(holdout_match=f"{match:.2f}")
            if match >= target:
                reached_at, decay_from = i + 1, i + 1
    bar.close()
    match = float(exact_match(params, *held)) if held is not None else float("nan")
    return WarmStartResult(params, [float(x) for x in jax.device_get(losses)], reached_at, match, len(losses))
