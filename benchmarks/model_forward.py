"""Forward throughput of the JAX Qwen2 against transformers' PyTorch Qwen2ForCausalLM, same weights.

    python -m benchmarks.model_forward [--hidden 512 --layers 8 --batch 8 --length 512 --iters 5]

Both run the same random weights (a transformers model saved to a temporary directory and loaded by our
loader) on the same right-padded batch; the logits are checked against each other before anything is
timed. Prints tokens/s of each and the ratio JAX / PyTorch. On CPU both use all cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from attnrl_jax.model import forward
from attnrl_jax.model.hf_io import load_checkpoint
from benchmarks.timing import median_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    hf = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 35 / 6) // 64 * 64,  # the 1.5B model's MLP ratio
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(4096, args.length),
    )
    model = Qwen2ForCausalLM(hf).eval()
    model.config._attn_implementation = "sdpa"
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        cfg, params, _ = load_checkpoint(d, param_dtype=args.dtype, dtype=args.dtype, remat="none")
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)

    rng = np.random.default_rng(0)
    lengths = rng.integers(args.length // 2, args.length + 1, args.batch)
    lengths[0] = args.length
    mask = (np.arange(args.length)[None] < lengths[:, None]).astype(np.int64)
    tokens = rng.integers(0, args.vocab, (args.batch, args.length)) * mask
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)

    jax_fn = jax.jit(lambda p, t, m: forward(p, t, cfg=cfg, segment_ids=m))
    t_j, m_j = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)
    t_t, m_t, p_t = torch.tensor(tokens), torch.tensor(mask), torch.tensor(positions)

    def run_jax():
        return jax.block_until_ready(jax_fn(params, t_j, m_j))

    def run_torch():
        with torch.inference_mode():
            return model(input_ids=t_t, attention_mask=m_t, position_ids=p_t).logits

    valid = mask.astype(bool)
    err = float(np.abs(np.asarray(run_jax()) - run_torch().float().numpy())[valid].max())
    tol = 1e-3 if args.dtype == "float32" else 0.5
    assert err <= tol, f"JAX and PyTorch logits differ by {err} (> {tol}); not timing a wrong result"

    n_tokens = int(mask.sum())
    s_jax, s_torch = median_seconds(run_jax, args.iters), median_seconds(run_torch, args.iters)
    device = jax.devices()[0].device_kind
    print(
        f"Qwen2 forward, hidden {args.hidden}, {args.layers} layers, "
        f"batch {args.batch} x length {args.length}, {args.dtype}, {n_tokens} valid tokens, "
        f"device {device}, {os.cpu_count()} CPU threads"
    )
    print(f"logits max abs diff JAX vs PyTorch: {err:.2e}")
    print(f"{'implementation':<28}{'median s/batch':>16}{'tokens/s':>12}")
    print(f"{'attnrl_jax (XLA, jit)':<28}{s_jax:>16.4f}{n_tokens / s_jax:>12.0f}")
    print(f"{'transformers (PyTorch)':<28}{s_torch:>16.4f}{n_tokens / s_torch:>12.0f}")
    print(f"ratio JAX / PyTorch tokens/s: {s_torch / s_jax:.2f}x")


if __name__ == "__main__":
    main()
