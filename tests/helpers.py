"""Shared builders for the tests: tiny random transformers Qwen2 checkpoints and padded batches."""

from __future__ import annotations

import numpy as np


def tiny_hf_model(
    *,
    vocab=96,
    hidden=32,
    inter=64,
    layers=2,
    heads=4,
    kv_heads=2,
    tie=False,
    theta=10000.0,
    seed=0,
    std=0.08,
):
    """A random transformers Qwen2ForCausalLM (eager attention), weights drawn wider than the default init
    so that every tensor, biases included, matters for the logits."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        max_position_embeddings=512,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.add_(1.0)
    return model


def padded_batch(vocab: int, lengths: list[int], total: int, seed: int = 0):
    """Right-padded random tokens [B, total] and their 0/1 mask."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (len(lengths), total)).astype(np.int64)
    mask = (np.arange(total)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    return tokens * mask, mask


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        )
    return out.logits.float().numpy()


def trainer_overrides(world, workdir, steps, preset="attnrl", off_policy=True) -> dict:
    """Config overrides of a trainer run on conftest's `task_world` (tiny model, float32, xla attention:
    the shipped pallas default is tested by tests/shipped_configs_test.py) for `steps` steps."""
    return {
        "workdir": str(workdir),
        "model.hf_path": str(world / "model"),
        "model.param_dtype": "float32",
        "model.dtype": "float32",
        "model.attention_impl": "xla",
        "data.train_path": str(world / "train.parquet"),
        "data.max_prompt_len": 40,
        "algo.preset": preset,
        "algo.group_size": 4,
        "algo.token_distance": 0,
        "algo.fci_buckets": 16,
        "algo.initial_batch": 2,
        "algo.target_paths": 20,
        "sampler.max_new_tokens": 10,
        "optim.lr": 1e-3,
        "train.steps": steps,
        "train.rows_per_device": 1,
        "train.mini_batch_rows": 16,
        "train.row_length": 56,
        "train.off_policy": off_policy,
        "reward.workers": 1,
        "ckpt.every": 1,
    }
