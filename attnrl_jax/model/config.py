"""Qwen2 model configuration: presets and the Hugging Face config.json mapping.

DeepSeek-R1-Distill-Qwen-1.5B/7B, the models AttnRL trains, are Qwen2-architecture models. The config reads
both the transformers 4.x form of config.json (top-level `rope_theta`, `rope_scaling`, `torch_dtype`) and
the 5.x form (`rope_parameters`, `dtype`), and refuses what this implementation does not support with an
error that names the file and the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("xla", "pallas")
REMAT_POLICIES = ("none", "full", "dots")


# The published config.json of DeepSeek-R1-Distill-Qwen: what the 1.5B and 7B share, then their sizes
# (vocab, width, MLP width, query and key/value heads).
_R1_DISTILL = dict(
    num_layers=28,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    max_position_embeddings=131072,
    bos_token_id=151646,
    eos_token_id=151643,
)
_R1_DISTILL_SIZES = {
    "1p5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_heads=12, num_kv_heads=2),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_heads=28, num_kv_heads=4),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Qwen2 decoder.

    Attributes:
      vocab_size: rows of the embedding (may exceed the tokenizer's vocabulary, never the reverse).
      hidden_size: model width D.
      intermediate_size: SwiGLU MLP width F.
      num_layers: decoder layers L.
      num_heads: query heads N; head_dim = hidden_size // num_heads.
      num_kv_heads: key/value heads K (grouped-query attention, N % K == 0).
      rms_norm_eps: RMSNorm epsilon.
      rope_theta: rotary embedding base.
      tie_word_embeddings: the LM head reuses the token embedding.
      max_position_embeddings: longest supported position (kept for export).
      param_dtype: storage dtype of the parameters ("float32" or "bfloat16").
      dtype: compute dtype of activations and matmuls; logits and log-softmax are always float32.
      remat: rematerialisation of each layer in the backward pass ("none", "full", or "dots" to save
        matmul outputs).
      attention_impl: the attention implementation behind the seam in `attention.py` ("xla" or
        "pallas"); FCI uses the matching implementation (Pallas kernel or query-chunked XLA).
      logits_chunk: tokens per row whose float32 logits exist at once when log-probs and entropies are
        computed (`token_log_probs_from_hidden`): the memory of that step is rows x logits_chunk x vocab x
        4 bytes per device instead of rows x length x vocab x 4.
      mlp_chunk: tokens per row whose SwiGLU hidden ([rows, chunk, intermediate_size]) exists at once, in
        the forward and in the rematerialised backward (the largest activation of a layer otherwise).
      bos_token_id, eos_token_id: written back on export.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "full"
    attention_impl: str = "xla"
    logits_chunk: int = 512
    mlp_chunk: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "logits_chunk",
            "mlp_chunk",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} is not a multiple of "
                f"model.num_kv_heads={self.num_kv_heads}"
            )
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"model.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"
            )
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(f"model.rope_theta and model.rms_norm_eps must be positive, got {self}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------------------------------------
    # Presets

    @classmethod
    def tiny(cls, **overrides) -> ModelConfig:
        """A 2-layer model for tests and CPU smoke runs."""
        base = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            rope_theta=10000.0,
            max_position_embeddings=2048,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def r1_distill_qwen_1p5b(cls, **overrides) -> ModelConfig:
        """DeepSeek-R1-Distill-Qwen-1.5B (its published config.json)."""
        return cls(**{**_R1_DISTILL, **_R1_DISTILL_SIZES["1p5b"], **overrides})

    @classmethod
    def r1_distill_qwen_7b(cls, **overrides) -> ModelConfig:
        """DeepSeek-R1-Distill-Qwen-7B (its published config.json)."""
        return cls(**{**_R1_DISTILL, **_R1_DISTILL_SIZES["7b"], **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        presets = {
            "tiny": cls.tiny,
            "r1_distill_qwen_1p5b": cls.r1_distill_qwen_1p5b,
            "r1_distill_qwen_7b": cls.r1_distill_qwen_7b,
        }
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(presets)}")
        return presets[name](**overrides)

    # ---------------------------------------------------------------------------------------------
    # Hugging Face config.json

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
        """Builds a config from a Hugging Face Qwen2 config.json dict (4.x or 5.x form).

        Args:
          hf: the parsed config.json.
          source: where it came from, for error messages.
          **overrides: fields to set that config.json does not carry (param_dtype, dtype, remat, ...).
            `param_dtype` defaults to bfloat16 for bfloat16 checkpoints, else float32.
        """
        _check_supported(hf, source)
        rope_theta = _rope_theta(hf, source)
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
            raise ValueError(
                f"{source}: head_dim={head_dim} differs from hidden_size/num_attention_heads="
                f"{hf['hidden_size']}/{hf['num_attention_heads']}; Qwen2 does not support that"
            )
        ckpt_dtype = hf.get("dtype") or hf.get("torch_dtype")
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        try:
            fields = dict(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"],
                num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
                param_dtype="bfloat16" if ckpt_dtype == "bfloat16" else "float32",
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=eos,
            )
        except KeyError as e:
            raise ValueError(f"{source}: required key {e.args[0]!r} is missing") from None
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf_dir(cls, path: str, **overrides) -> ModelConfig:
        """Reads `path`/config.json (see `from_hf_dict`)."""
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path}: no config.json in the checkpoint directory {path!r}")
        try:
            with open(cfg_path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(hf, source=cfg_path, **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json of this model as transformers 5.x writes it for Qwen2ForCausalLM."""
        # (imported here: transformers loads torch where it is installed, about 2 s a process)
        from transformers import Qwen2Config

        hf = Qwen2Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            use_sliding_window=False,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            dtype=self.param_dtype,
            architectures=["Qwen2ForCausalLM"],
        ).to_dict()
        # Written for transformers 4.x readers too, which look for the top-level key.
        hf["rope_theta"] = self.rope_theta
        return hf


def _check_supported(hf: dict[str, Any], source: str) -> None:
    """Refuses, naming the key, a config.json of anything but a plain Qwen2 (architecture, sliding window,
    layer types, activation)."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type != "qwen2" or (archs and "Qwen2ForCausalLM" not in archs):
        raise ValueError(
            f"{source}: architecture {archs or None} (model_type {model_type!r}) is not supported; "
            "expected Qwen2ForCausalLM (model_type 'qwen2')"
        )
    if hf.get("use_sliding_window"):
        raise ValueError(
            f"{source}: use_sliding_window=true is not supported (sliding-window attention is not "
            "implemented); set it to false"
        )
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(
            f"{source}: layer_types {sorted(set(layer_types))} is not supported; only full_attention"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act={act!r} is not supported; Qwen2 uses 'silu'")


def _rope_theta(hf: dict[str, Any], source: str) -> float:
    """The rotary base of a config.json (4.x `rope_theta`, or 5.x `rope_parameters`), refusing any scaled
    rotary embedding."""
    rope_theta = hf.get("rope_theta")
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ValueError(f"{source}: {key} must be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"{source}: {key} type {rope_type!r} is not supported; only the default rotary "
                "embedding (no scaling) is implemented"
            )
        if "rope_theta" in rope:
            rope_theta = rope["rope_theta"]
    if rope_theta is None:
        rope_theta = 10000.0
    return rope_theta
