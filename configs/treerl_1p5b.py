"""TreeRL (entropy branch points, all responses branched, two sampler calls a step, on-policy), section 14."""

from configs import attnrl_1p5b


def get_config():
    c = attnrl_1p5b.get_config()
    c.workdir = "runs/treerl_1p5b"
    c.algo.preset = "treerl"
    c.train.off_policy = False
    return c
