"""Evaluation entry point: `python eval.py --config=configs/eval.py --checkpoint=DIR [--config.eval.k=4 ...]`.

Thin on purpose: flags, then the config, then one call into the library (`attnrl_jax.eval_job`).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from attnrl_jax import cli

if __name__ == "__main__":  # before the config flag: it applies the overrides
    cli.exit_on_unknown_keys(sys.argv, "configs/eval.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/eval.py", "Path to an eval config file.", lock_config=True
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A Hugging Face directory or a training run directory.")
_COMPILE_ONLY = flags.DEFINE_string(
    "compile_only",
    None,
    "Compile the evaluation call for TARGET (v5e-8, h100-8, ...) with its real compiler on this machine and "
    "check it fits (attnrl_jax/fit.py); the architecture comes from --checkpoint's config.json when it is "
    "here, else config.model.preset.",
)
_COMPILE_LAYERS = flags.DEFINE_integer("compile_layers", 0, "With --compile_only: the model's depth.")


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    config = _CONFIG.value
    if _CHECKPOINT.value:
        with config.unlocked():
            config.checkpoint = _CHECKPOINT.value
    if _COMPILE_ONLY.value:
        # Before JAX starts: the target's devices are compile-only. (The config file may have imported JAX
        # already, which read the environment then: set its option too; no backend has started yet.)
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax

        jax.config.update("jax_platforms", "cpu")
        from attnrl_jax import fit

        if config.checkpoint and os.path.isfile(os.path.join(config.checkpoint, "config.json")):
            with config.unlocked():
                config.model.hf_path = config.checkpoint  # the architecture of the checkpoint given
        sys.exit(fit.cli(config, _COMPILE_ONLY.value, "eval", _COMPILE_LAYERS.value))
    from attnrl_jax.targets import GPU_MEMORY_FRACTION

    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(GPU_MEMORY_FRACTION))
    from attnrl_jax import JobError, eval_job

    try:
        eval_job.run(config)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, JobError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
