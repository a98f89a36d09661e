"""Random branch points at step boundaries (an ablation; not a paper RL baseline), one-step off-policy."""

from configs import attnrl_1p5b


def get_config():
    c = attnrl_1p5b.get_config()
    c.workdir = "runs/random_branching_1p5b"
    c.algo.preset = "random_branching"
    c.train.off_policy = True
    return c
