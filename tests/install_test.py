"""The kernel folder shadows nothing: run from the checkout (the repository root on sys.path), `import
kernels` finds the installed Hugging Face `kernels` distribution (transformers >= 5.25 requires and imports
it) or nothing, never our top-level `kernels/` folder, which is importable only as `attnrl_jax.kernels`."""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = textwrap.dedent(
    """
    import importlib.util, os, sys
    import attnrl_jax, attnrl_jax.kernels.fci, transformers
    from transformers import AutoConfig, PreTrainedTokenizerFast
    from transformers.utils.import_utils import is_kernels_available

    tok = PreTrainedTokenizerFast(tokenizer_file=sys.argv[1] + "/tokenizer.json")
    ids = tok.encode("Step 1.\\n\\nSo x = 2.")
    assert tok.decode(ids) == "Step 1.\\n\\nSo x = 2.", tok.decode(ids)
    cfg = AutoConfig.from_pretrained(sys.argv[2])
    assert cfg.model_type == "qwen2"
    spec = importlib.util.find_spec("kernels")
    origin = None if spec is None else (spec.origin or list(spec.submodule_search_locations)[0])
    print("kernels_available", is_kernels_available())
    print("top_level_kernels", origin and os.path.realpath(origin))
    print("attnrl_kernels", os.path.realpath(attnrl_jax.kernels.fci.__file__))
    """
)


def _probe(cwd, tokenizer_dir, config_dir):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, tokenizer_dir, config_dir],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())


@pytest.mark.slow
def test_kernels_folder_shadows_no_installed_package(tmp_path, qwen_tokenizer_dir):
    from attnrl_jax.model import ModelConfig

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(ModelConfig.tiny().to_hf_dict()))
    ours = os.path.join(REPO, "kernels")
    outside = _probe(str(tmp_path), qwen_tokenizer_dir, str(tmp_path / "cfg"))
    inside = _probe(REPO, qwen_tokenizer_dir, str(tmp_path / "cfg"))
    try:  # transformers >= 5.25 installs Hugging Face's `kernels`
        importlib.metadata.version("kernels")
        hf_kernels = True
    except importlib.metadata.PackageNotFoundError:
        hf_kernels = False
    for seen in (outside, inside):
        # attnrl_jax.kernels is the repository's folder (the editable install follows the link) ...
        assert seen["attnrl_kernels"] == os.path.join(ours, "fci.py")
    if hf_kernels:
        # ... and the top-level `kernels` is the installed distribution, from the checkout too.
        for seen in (outside, inside):
            assert not seen["top_level_kernels"].startswith(ours), seen
        assert inside == outside  # the working directory changes nothing transformers sees
    else:
        # Without it, the checkout's folder (no __init__.py, no distribution metadata) is never taken
        # for the package by transformers.
        assert outside["top_level_kernels"] == "None"
        assert inside["kernels_available"] == outside["kernels_available"] == "False"
