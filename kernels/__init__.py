"""Pallas kernels of attnrl_jax (installed as `attnrl_jax.kernels`).

The folder is named `kernels/` in the repository, but setup.py installs it under `attnrl_jax.kernels` so
that it never shadows Hugging Face's `kernels` distribution, which transformers detects by import name.
Keep this module free of imports and of a `__version__`: transformers may import a top-level `kernels`
found on sys.path (the repository root) while probing, and must find nothing that looks like that package.
"""
