"""Installing attnrl_jax never makes transformers believe Hugging Face's `kernels` package is present."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = textwrap.dedent(
    """
    import importlib.util, sys
    import attnrl_jax, attnrl_jax.kernels, transformers
    from transformers import AutoConfig, PreTrainedTokenizerFast
    from transformers.utils.import_utils import is_kernels_available

    tok = PreTrainedTokenizerFast(tokenizer_file=sys.argv[1] + "/tokenizer.json")
    ids = tok.encode("Step 1.\\n\\nSo x = 2.")
    assert tok.decode(ids) == "Step 1.\\n\\nSo x = 2.", tok.decode(ids)
    cfg = AutoConfig.from_pretrained(sys.argv[2])
    assert cfg.model_type == "qwen2"
    print("kernels_available", is_kernels_available())
    print("top_level_kernels", importlib.util.find_spec("kernels") is not None)
    print("attnrl_kernels", attnrl_jax.kernels.__name__)
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


def test_transformers_does_not_see_a_kernels_package(tmp_path, qwen_tokenizer_dir):
    import json

    from attnrl_jax.model import ModelConfig

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(ModelConfig.tiny().to_hf_dict()))
    # Outside the repository: the installed package exposes no top-level `kernels` module at all.
    outside = _probe(str(tmp_path), qwen_tokenizer_dir, str(tmp_path / "cfg"))
    assert outside == {
        "kernels_available": "False",
        "top_level_kernels": "False",
        "attnrl_kernels": "attnrl_jax.kernels",
    }
    # In the repository root, where the source folder `kernels/` is importable: still not mistaken for it.
    inside = _probe(REPO, qwen_tokenizer_dir, str(tmp_path / "cfg"))
    assert inside["kernels_available"] == "False"
