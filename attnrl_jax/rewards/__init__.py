"""Rewards: the hybrid math verifier (DeepScaleR rules + Math-Verify) and its process pool."""

from attnrl_jax.rewards.math_grader import Verdict, grade, last_boxed, solution_text
from attnrl_jax.rewards.pool import VerifierPool

__all__ = ["Verdict", "VerifierPool", "grade", "last_boxed", "solution_text"]
