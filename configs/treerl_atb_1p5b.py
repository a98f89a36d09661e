"""TreeRL with ATB (FCI branch points, every response branched, on-policy), section 14."""

from configs import attnrl_1p5b


def get_config():
    c = attnrl_1p5b.get_config()
    c.workdir = "runs/treerl_atb_1p5b"
    c.algo.preset = "treerl_atb"
    c.train.off_policy = False
    return c
