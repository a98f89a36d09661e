"""Evaluation settings (docs/algorithm.md section 13):
`python eval.py --config=configs/eval.py --checkpoint=DIR`.

DIR is a Hugging Face directory (config.json + safetensors + tokenizer) or a training run's workdir (its
latest Orbax checkpoint). Results go to <output>.json and <output>.md.
"""

from ml_collections import ConfigDict

from attnrl_jax.eval_job import default_config


def get_config() -> ConfigDict:
    """Every field, its meaning and default: `attnrl_jax.eval_job.default_config`."""
    return default_config()
