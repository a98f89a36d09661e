"""Evaluation settings (ALGORITHM.md section 13): `python eval.py --config=configs/eval.py --checkpoint=DIR`.

DIR is a Hugging Face directory (config.json + safetensors + tokenizer) or a training run's workdir (its
latest Orbax checkpoint). Results go to <output>.json and <output>.md.
"""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.job = "eval"
    c.seed = 0  # sampling seed
    c.checkpoint = ""  # set with --checkpoint=DIR (or --config.checkpoint=DIR)
    c.tokenizer_path = ""  # default: the checkpoint's own tokenizer

    c.model = ConfigDict()
    # The checkpoint's architecture, for `eval.py --compile_only=TARGET` when --checkpoint is not on this
    # machine (an evaluation reads it from the checkpoint): r1_distill_qwen_1p5b | r1_distill_qwen_7b.
    c.model.preset = "r1_distill_qwen_1p5b"
    c.model.param_dtype = "bfloat16"  # float32 | bfloat16
    c.model.dtype = "bfloat16"
    c.model.remat = "none"
    c.model.attention_impl = "pallas"  # pallas (GPU/TPU) | xla

    c.mesh = ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    c.eval = ConfigDict()
    c.eval.data = "../shared/data/eval"  # a directory of verl parquet files, or comma-separated files
    c.eval.k = 0  # samples per problem; 0: section 13's (32 for AIME24/25 and AMC23, 4 for the others)
    c.eval.max_new_tokens = 32768  # the paper's final evaluation length
    c.eval.max_prompt_len = 2048  # longer prompts are skipped and counted
    c.eval.temperature = 0.6
    c.eval.top_p = 1.0
    c.eval.top_k = 0
    c.eval.batch_prompts = 64  # prompts per sampler call
    # Per-chip memory for the decode slots (continuous batching beyond), GiB; unset: memory_fraction of what
    # the chip has left after the parameters (attnrl_jax/memory.py; 12 GiB on a CPU); 0: no limit.
    c.eval.cache_gib = config_dict.placeholder(float)
    c.eval.memory_fraction = 0.8
    c.eval.page_size = 128  # positions per KV-cache page (a power of two of at least 16)
    c.eval.output = ""  # results prefix; default: <checkpoint>/eval/results

    c.reward = ConfigDict()
    c.reward.workers = 0  # verifier processes (0: CPU count)
    c.reward.timeout = 5.0
    return c
