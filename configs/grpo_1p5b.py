"""GRPO (outcome reward, group-normalised; no tree), section 14, with the 1.5B run's settings."""

from configs import attnrl_1p5b


def get_config():
    c = attnrl_1p5b.get_config()
    c.workdir = "runs/grpo_1p5b"
    c.algo.preset = "grpo"
    c.train.off_policy = True
    return c
