"""AttnRL on DeepSeek-R1-Distill-Qwen-7B with the 1.5B run's settings (the paper's 7B row); shard it over a
larger FSDP axis (all devices by default) and add tensor parallelism with --config.mesh.tensor=N."""

from configs import attnrl_1p5b


def get_config():
    c = attnrl_1p5b.get_config()
    c.workdir = "runs/attnrl_7b"
    c.model.hf_path = "checkpoints/DeepSeek-R1-Distill-Qwen-7B"
    c.model.preset = "r1_distill_qwen_7b"  # its architecture, for --compile_only without the checkpoint
    return c
