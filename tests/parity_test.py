"""Logits parity with transformers' PyTorch Qwen2ForCausalLM, export round trips and preset sizes."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

from attnrl_jax.model import ModelConfig, count_params, forward, init_params
from attnrl_jax.model.hf_io import INDEX_FILE, load_checkpoint, save_checkpoint
from helpers import padded_batch, tiny_hf_model, torch_logits

LENGTHS = [11, 7, 3]  # a right-padded batch of unequal lengths
TOTAL = 11


def _ours(cfg, params, tokens, mask):
    return np.asarray(forward(params, jnp.asarray(tokens), cfg=cfg, segment_ids=jnp.asarray(mask)))


def _max_err(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.mark.parametrize(
    "tie,heads,kv_heads",
    [(False, 4, 4), (True, 4, 2), (False, 8, 2), (True, 8, 8)],
    ids=["untied-gqa1", "tied-gqa2", "untied-gqa4", "tied-gqa1"],
)
def test_float32_logits_match_transformers(tmp_path, tie, heads, kv_heads):
    model = tiny_hf_model(tie=tie, heads=heads, kv_heads=kv_heads, hidden=64, seed=heads + kv_heads)
    model.save_pretrained(tmp_path)
    cfg, params, _ = load_checkpoint(str(tmp_path))
    assert (cfg.tie_word_embeddings, cfg.num_heads, cfg.num_kv_heads) == (tie, heads, kv_heads)
    assert ("lm_head" in params) == (not tie)
    tokens, mask = padded_batch(cfg.vocab_size, LENGTHS, TOTAL)
    ref = torch_logits(model, tokens, mask)
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits
    err = _max_err(_ours(cfg, params, tokens, mask), ref, mask)
    assert err <= 1e-4, err


@pytest.mark.slow
def test_padded_rows_equal_unpadded_rows(tmp_path):
    model = tiny_hf_model()
    model.save_pretrained(tmp_path)
    cfg, params, _ = load_checkpoint(str(tmp_path))
    tokens, mask = padded_batch(cfg.vocab_size, LENGTHS, TOTAL)
    batched = _ours(cfg, params, tokens, mask)
    for row, n in enumerate(LENGTHS):
        alone = _ours(cfg, params, tokens[row : row + 1, :n], mask[row : row + 1, :n])
        np.testing.assert_allclose(batched[row, :n], alone[0], atol=1e-5)


def test_bfloat16_within_stated_tolerance(tmp_path):
    """bf16 params and compute: our error against the float32 reference is at most 2x transformers' own
    bf16 error (plus 0.02), and at most 0.25 absolute on logits of scale ~5."""
    model = tiny_hf_model(hidden=64, heads=4, kv_heads=2)
    model.save_pretrained(tmp_path)
    tokens, mask = padded_batch(model.config.vocab_size, LENGTHS, TOTAL)
    ref32 = torch_logits(model, tokens, mask)
    ref16 = torch_logits(model.to(torch.bfloat16), tokens, mask)
    cfg, params, _ = load_checkpoint(str(tmp_path), param_dtype="bfloat16", dtype="bfloat16")
    assert params["embed"].dtype == jnp.bfloat16
    ours16 = _ours(cfg, params, tokens, mask)
    assert ours16.dtype == np.float32  # logits are float32 whatever the compute dtype
    torch_err = _max_err(ref16, ref32, mask)
    our_err = _max_err(ours16, ref32, mask)
    assert our_err <= 2 * torch_err + 0.02, (our_err, torch_err)
    assert our_err <= 0.25, our_err


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "index"])
def test_export_reloads_in_transformers_with_identical_logits(tmp_path, sharded):
    model = tiny_hf_model(tie=sharded)
    model.save_pretrained(tmp_path / "src")
    cfg, params, _ = load_checkpoint(str(tmp_path / "src"))
    out = str(tmp_path / "export")
    save_checkpoint(out, cfg, params, max_shard_bytes=20_000 if sharded else 4 << 30)
    assert os.path.isfile(os.path.join(out, INDEX_FILE)) == sharded
    reloaded = Qwen2ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens, mask = padded_batch(cfg.vocab_size, LENGTHS, TOTAL)
    np.testing.assert_array_equal(torch_logits(reloaded, tokens, mask), torch_logits(model, tokens, mask))
    # and back into JAX: identical parameters
    cfg2, params2, _ = load_checkpoint(out)
    assert cfg2 == cfg
    np.testing.assert_array_equal(_ours(cfg2, params2, tokens, mask), _ours(cfg, params, tokens, mask))


def test_export_of_random_init_loads_in_transformers(tmp_path):
    """Params born in JAX (not loaded) export to a directory transformers reads with the same logits."""
    import jax

    cfg = ModelConfig.tiny(vocab_size=64, tie_word_embeddings=False, rope_theta=5e5)
    params = init_params(cfg, jax.random.key(3))
    save_checkpoint(str(tmp_path / "x"), cfg, params)
    hf_cfg = AutoConfig.from_pretrained(tmp_path / "x")
    assert hf_cfg.model_type == "qwen2" and hf_cfg.num_key_value_heads == cfg.num_kv_heads
    model = Qwen2ForCausalLM.from_pretrained(tmp_path / "x", attn_implementation="eager").eval()
    tokens, mask = padded_batch(cfg.vocab_size, LENGTHS, TOTAL, seed=4)
    err = _max_err(_ours(cfg, params, tokens, mask), torch_logits(model, tokens, mask), mask)
    assert err <= 1e-5, err


@pytest.mark.parametrize("preset", ["r1_distill_qwen_1p5b", "r1_distill_qwen_7b"])
def test_preset_parameter_count_equals_transformers(preset):
    import jax

    cfg = ModelConfig.preset(preset)
    abstract = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    ours = count_params(abstract)
    hf = Qwen2Config(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("transformers_version",)})
    with torch.device("meta"):
        theirs = sum(p.numel() for p in Qwen2ForCausalLM(hf).parameters())
    assert ours == theirs
    expected = {"r1_distill_qwen_1p5b": 1_777_088_000, "r1_distill_qwen_7b": 7_615_616_512}[preset]
    assert ours == expected


def test_config_json_4x_form_is_read(tmp_path):
    """Real checkpoints on disk use the 4.x form: top-level rope_theta and torch_dtype."""
    model = tiny_hf_model(theta=1e6)
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        hf = json.load(f)
    hf.pop("rope_parameters")
    hf.pop("dtype", None)
    hf.update(rope_theta=1e6, torch_dtype="bfloat16", rope_scaling=None)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf, f)
    cfg = ModelConfig.from_hf_dir(str(tmp_path))
    assert cfg.rope_theta == 1e6 and cfg.param_dtype == "bfloat16"
    cfg32, params, _ = load_checkpoint(str(tmp_path), param_dtype="float32")
    tokens, mask = padded_batch(cfg.vocab_size, LENGTHS, TOTAL)
    assert _max_err(_ours(cfg32, params, tokens, mask), torch_logits(model, tokens, mask), mask) <= 1e-4
