"""Evaluation entry point: `python eval.py --config=configs/eval.py --checkpoint=DIR [--config.eval.k=4 ...]`.

Thin on purpose: flags, then the config, then one call into the library (`attnrl_jax.eval_job`).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/eval.py", "Path to an eval config file.", lock_config=True
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A Hugging Face directory or a training run directory.")


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    config = _CONFIG.value
    if _CHECKPOINT.value:
        with config.unlocked():
            config.checkpoint = _CHECKPOINT.value
    from attnrl_jax import eval_job

    try:
        eval_job.run(config)
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
