"""Entry point: `python train.py --config=configs/<name>.py [--config.a.b=value ...]`.

Kept thin on purpose: flags, then the config, then one call into the library.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from attnrl_jax import cli

if __name__ == "__main__":  # before the config flag: it applies the overrides
    cli.exit_on_unknown_keys(sys.argv, None)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_COMPILE_ONLY = flags.DEFINE_string(
    "compile_only",
    None,
    "Compile every program of the run for TARGET (v5e-8, v5p-16, v6e-8, h100-8, ...) with that target's real "
    "compiler on this machine, print per-chip memory against capacity, exit 1 if any does not compile or "
    "fit (attnrl_jax/fit.py; needs pip install -e '.[tpu]' or '.[cuda]').",
)
_COMPILE_LAYERS = flags.DEFINE_integer(
    "compile_layers", 0, "With --compile_only: compile a model of this depth (a quicker structure check)."
)


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    if _CONFIG.value is None:
        sys.exit("error: --config=configs/<name>.py is required")
    # transformers is used for configs and tokenizers only; its notice that PyTorch is absent is noise here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    config = _CONFIG.value
    kind = config.get("job", "smoke")
    if _COMPILE_ONLY.value:
        if kind != "train":
            sys.exit(f"error: --compile_only checks training configs (config.job=train), not job={kind!r}")
        # Before JAX starts: the target's devices are compile-only. (The config file may have imported JAX
        # already, which read the environment then: set its option too; no backend has started yet.)
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax

        jax.config.update("jax_platforms", "cpu")
        from attnrl_jax import fit

        sys.exit(fit.cli(config, _COMPILE_ONLY.value, "train", _COMPILE_LAYERS.value))
    from attnrl_jax.targets import GPU_MEMORY_FRACTION

    # On a GPU, JAX's client preallocates 75% of the memory by default; the run is sized for this share.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(GPU_MEMORY_FRACTION))
    if kind == "train":
        from attnrl_jax import trainer as job
    elif kind == "task":
        from attnrl_jax.task import pipeline as job
    elif kind == "smoke":
        from attnrl_jax import smoke as job
    else:
        sys.exit(f"error: config.job={kind!r}; expected train, task or smoke")

    from attnrl_jax import distributed

    try:
        # Before any JAX backend starts: joins the other processes when the config or environment says so.
        distributed.initialize(config)
    except ValueError as e:
        sys.exit(f"error: {e}")
    except Exception as e:  # the coordinator did not answer, a process id is taken, ...
        sys.exit(f"error: joining the multi-process run failed (config.distributed): {e}")
    try:
        job.run(config)
    except BaseException as e:
        distributed.fail(e)  # in a multi-process run: says which process failed and why, and exits 1
        from attnrl_jax import JobError

        if isinstance(
            e, (ValueError, FileNotFoundError, FileExistsError, KeyError, FloatingPointError, JobError)
        ):
            sys.exit(f"error: {e}")
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C outside RL (which saves its step and returns)
            print(
                "\ninterrupted: finished stages and saved checkpoint steps are kept (an unfinished stage is "
                "redone); run the same command again to resume",
                file=sys.stderr,
            )
            sys.exit(130)
        raise
    distributed.shutdown()


if __name__ == "__main__":
    app.run(main)
