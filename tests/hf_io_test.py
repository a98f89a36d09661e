"""Checkpoint loading refuses what it does not support, with an error that names the problem."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from attnrl_jax.model import ModelConfig, init_params
from attnrl_jax.model.hf_io import check_tokenizer_vocab, load_checkpoint, save_checkpoint
from helpers import tiny_hf_model


@pytest.fixture
def ckpt(tmp_path):
    tiny_hf_model().save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_config(path, **changes):
    with open(path / "config.json") as f:
        hf = json.load(f)
    for k, v in changes.items():
        if v is None:
            hf.pop(k, None)
        else:
            hf[k] = v
    with open(path / "config.json", "w") as f:
        json.dump(hf, f)


def _edit_weights(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_other_architecture(ckpt):
    _edit_config(ckpt, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(
        ValueError, match=r"config\.json: architecture \['LlamaForCausalLM'\].*'llama'.*Qwen2"
    ):
        load_checkpoint(str(ckpt))


def test_sliding_window_switched_on(ckpt):
    _edit_config(ckpt, use_sliding_window=True, sliding_window=64)
    with pytest.raises(ValueError, match="use_sliding_window=true is not supported"):
        load_checkpoint(str(ckpt))


@pytest.mark.parametrize(
    "changes,kind",
    [
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "'yarn'"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "'linear'"),
    ],
    ids=["4.x-rope_scaling", "5.x-rope_parameters"],
)
def test_rope_scaling_not_implemented(ckpt, changes, kind):
    _edit_config(ckpt, **changes)
    with pytest.raises(ValueError, match=f"type {kind} is not supported"):
        load_checkpoint(str(ckpt))


def test_missing_tensor_is_named(ckpt):
    _edit_weights(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(str(ckpt))


def test_misshapen_tensor_names_both_shapes(ckpt):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]

    _edit_weights(ckpt, shrink)
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(8, 32\).*\(16, 32\)"
    ):
        load_checkpoint(str(ckpt))


def test_config_tokenizer_vocabulary_mismatch(ckpt, qwen_tokenizer_dir):
    """The real Qwen tokenizer (151k tokens) next to a 96-row embedding is refused."""
    import shutil

    for f in os.listdir(qwen_tokenizer_dir):
        shutil.copy(os.path.join(qwen_tokenizer_dir, f), ckpt)
    with pytest.raises(ValueError, match=r"tokenizer has 1516\d\d tokens but the model's vocab_size is 96"):
        load_checkpoint(str(ckpt))


def test_tokenizer_that_fits_is_accepted():
    class Tok:
        def __len__(self):
            return 100

    check_tokenizer_vocab(ModelConfig.tiny(vocab_size=128), Tok())
    with pytest.raises(ValueError, match="100 tokens but the model's vocab_size is 64"):
        check_tokenizer_vocab(ModelConfig.tiny(vocab_size=64), Tok())


def test_missing_config_and_weights(tmp_path, ckpt):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_checkpoint(str(tmp_path / "nowhere"))
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_checkpoint(str(ckpt))


def test_index_naming_a_missing_shard(tmp_path):
    model = tiny_hf_model()
    model.save_pretrained(tmp_path / "s", max_shard_size="20KB")
    shards = sorted(f for f in os.listdir(tmp_path / "s") if f.startswith("model-"))
    assert len(shards) > 1
    cfg, params, _ = load_checkpoint(str(tmp_path / "s"))  # the sharded form loads
    assert params["layers"]["q"].shape[0] == cfg.num_layers
    os.remove(tmp_path / "s" / shards[-1])
    with pytest.raises(FileNotFoundError, match=f"lists shard files that do not exist: \\['{shards[-1]}'\\]"):
        load_checkpoint(str(tmp_path / "s"))


def test_weights_of_a_deeper_model(ckpt):
    _edit_config(ckpt, num_hidden_layers=1, layer_types=["full_attention"])
    with pytest.raises(ValueError, match="do not belong to a 1-layer Qwen2"):
        load_checkpoint(str(ckpt))


def test_invalid_json_and_missing_key(ckpt):
    _edit_config(ckpt, hidden_size=None)
    with pytest.raises(ValueError, match="required key 'hidden_size' is missing"):
        load_checkpoint(str(ckpt))
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_checkpoint(str(ckpt))


def test_export_refuses_non_empty_destination_and_leaves_nothing_on_failure(tmp_path):
    import jax

    cfg = ModelConfig.tiny()
    params = init_params(cfg, jax.random.key(0))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="busy: export destination exists"):
        save_checkpoint(str(tmp_path / "busy"), cfg, params)
    assert os.listdir(tmp_path / "busy") == ["keep.txt"]

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(tmp_path / "out"), cfg, params, tokenizer=BrokenTokenizer())
    assert sorted(os.listdir(tmp_path)) == ["busy"]  # neither `out` nor a temporary directory remains


def test_bad_model_config_values():
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of model.num_kv_heads=4"):
        ModelConfig.tiny(num_heads=6, num_kv_heads=4, hidden_size=60)
    with pytest.raises(ValueError, match="model.param_dtype must be one of"):
        ModelConfig.tiny(param_dtype="float16")
    with pytest.raises(ValueError, match="unknown model preset 'qwen3'"):
        ModelConfig.preset("qwen3")
    np.testing.assert_equal(ModelConfig.tiny().head_dim, 16)
