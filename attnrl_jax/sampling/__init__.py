"""Generation: token sampling, the jitted decode loop with FCI while decoding, and the host sampler."""

from attnrl_jax.sampling.loop import LoopSettings, generate
from attnrl_jax.sampling.sampler import ContinuationRequest, Sample, Sampler
from attnrl_jax.sampling.sampling import SamplingParams, sample_tokens

__all__ = [
    "ContinuationRequest",
    "LoopSettings",
    "Sample",
    "Sampler",
    "SamplingParams",
    "generate",
    "sample_tokens",
]
