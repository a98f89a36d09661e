"""Tiny CPU smoke run of the Qwen2 policy: `python train.py --config=configs/tiny.py` (about a minute)."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.job = "smoke"  # smoke (this model check) | train (configs/base.py and its derivatives)
    c.seed = 0  # PRNG seed of the parameter init and the synthetic batch
    c.workdir = "runs/smoke"  # outputs (the exported Hugging Face checkpoint) go under here

    c.model = ConfigDict()
    c.model.preset = "tiny"  # ModelConfig preset: tiny | r1_distill_qwen_1p5b | r1_distill_qwen_7b
    c.model.hf_path = ""  # a Hugging Face Qwen2 checkpoint directory to load instead of the preset
    c.model.param_dtype = "float32"  # parameter storage dtype: float32 | bfloat16
    c.model.dtype = "float32"  # activation/matmul dtype: float32 | bfloat16 (logits are always float32)
    c.model.remat = "full"  # per-layer rematerialisation in the backward pass: none | full | dots
    c.model.attention_impl = "xla"  # implementation behind the attention seam

    c.mesh = ConfigDict()
    c.mesh.data = 1  # data-parallel axis size
    c.mesh.fsdp = -1  # FSDP axis size (-1: all remaining devices)
    c.mesh.tensor = 1  # tensor-parallel axis size (heads, MLP, vocab)

    c.smoke = ConfigDict()
    c.smoke.batch_size = 8  # rows of the synthetic right-padded batch
    c.smoke.seq_len = 128  # padded length of each row, in tokens
    c.smoke.iters = 5  # timed forward passes after the compile
    return c
