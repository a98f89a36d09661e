"""The paper's AttnRL run (docs/algorithm.md section 11's table): DeepSeek-R1-Distill-Qwen-1.5B, 8k responses,
G = 6, N = 2, T = 2, 64 prompts then adaptive, one-step off-policy, clip-higher 0.2/0.28, dual clip 3,
k3 KL 0.001, AdamW lr 1e-6, 192-sequence PPO mini-batches, 500 steps.

    python train.py --config=configs/attnrl_1p5b.py \\
        --config.model.hf_path=/ckpt/DeepSeek-R1-Distill-Qwen-1.5B \\
        --config.data.train_path=/data/train.parquet
"""

from configs import base


def get_config():
    c = base.get_config()
    c.workdir = "runs/attnrl_1p5b"
    c.model.hf_path = "checkpoints/DeepSeek-R1-Distill-Qwen-1.5B"  # download it from the Hugging Face Hub
    # The architecture of that checkpoint, for `--compile_only` on a machine without it (training loads
    # hf_path; docs/algorithm.md section 11).
    c.model.preset = "r1_distill_qwen_1p5b"
    c.data.train_path = "data/train/dapo+math_train.parquet"  # verl format (docs/algorithm.md section 2)
    c.algo.preset = "attnrl"
    c.train.off_policy = True
    return c
