"""Does FCI find the anchors? On the `program` task, how well each branching criterion picks the pivotal
steps of a policy's own responses (issue: "where AttnRL should win").

For every well-formed response (its k-th step computes the question's k-th statement), three criteria
choose N branch steps the way the trainer does (`algo.branch_points`): ATB on the step FCI, TreeRL's
highest-entropy tokens (each mapped to the step it is in), and uniformly random steps. Their precision is
the fraction of chosen steps that are pivots. Each criterion's step score (FCI; the step's largest token
entropy; none for random) is also rank-correlated (Spearman) with how often each step is read later, the
reference count of `program.Structure`. Step 1 is left out of both: no criterion may branch there
(docs/algorithm.md section 6) and the generator puts no pivot there.

`response_scores` works on arrays and is checked by hand in the tests; `measure` samples a policy and
aggregates them.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os

import numpy as np

from attnrl_jax.algo import AlgoConfig, Steps, branch_points
from attnrl_jax.data import read_verl_parquet
from attnrl_jax.model.hf_io import load_checkpoint
from attnrl_jax.rollout import encode_problems, sample_steps
from attnrl_jax.sampling import Sampler
from attnrl_jax.settings import algo_config, loop_settings
from attnrl_jax.task.program import NAMES, Structure, structure

CRITERIA = ("fci", "entropy", "random")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation with average ranks for ties; nan when either side is constant. (Written
    out because scipy is not a runtime dependency; the tests check it against scipy.)"""

    def ranks(v):
        v = np.asarray(v, np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def well_formed(text: str, structure: Structure) -> bool:
    """The response's "\\n\\n" steps are the question's statements in order (step k starts with the k-th
    computed name), and it has exactly as many: only then is step k the step that computes value k."""
    thinking = text.split("</think>")[0].rstrip("\n")
    steps = thinking.split("\n\n")
    return len(steps) == structure.steps and all(s.startswith(f"{NAMES[k]}:") for k, s in enumerate(steps, 1))


def step_of_offsets(steps: Steps, offsets: np.ndarray) -> np.ndarray:
    """1-based step of each response-token offset."""
    return np.searchsorted(steps.bounds, np.asarray(offsets), side="right")


def response_scores(
    fci: np.ndarray,
    entropy: np.ndarray,
    steps: Steps,
    structure: Structure,
    algo: AlgoConfig,
    rng: np.random.Generator,
) -> dict[str, dict[str, float]]:
    """Per criterion, the precision of its N branch steps (pivots among them / N) and the Spearman
    correlation of its step score with the reference counts over steps 2..S (nan for random).

    Args:
      fci: [S] step FCI of response steps 1..S (the sampler's, zeroing rules applied).
      entropy: [R] token entropies of the response.
      steps: its segmentation, S = structure.steps.
      structure: the problem's structure.
      algo: branching settings (N = algo.atb.num_points; ATB's quantile and token distance).
      rng: the random criterion's source.
    """
    s = steps.num_steps
    if s != structure.steps or len(fci) != s:
        raise ValueError(
            f"a response of {s} steps ({len(fci)} FCI scores) for a {structure.steps}-step problem"
        )
    pivotal, counts = structure.pivotal[1:], structure.counts[1:].astype(np.float64)  # steps 1..S
    entropy = np.asarray(entropy, np.float64)
    step_entropy = np.array([entropy[a:b].max() for a, b in zip(steps.bounds[:-1], steps.bounds[1:])])
    score = {"fci": np.asarray(fci, np.float64), "entropy": step_entropy}
    out = {}
    for name in CRITERIA:
        config = algo.replace(branch_criterion=name)
        offsets = branch_points(config, steps, fci=score.get("fci"), entropy=entropy, rng=rng)
        chosen = step_of_offsets(steps, offsets)  # 1-based
        out[name] = {
            "precision": float(pivotal[chosen - 1].mean()) if len(chosen) else float("nan"),
            "spearman": spearman(score[name][1:], counts[1:]) if name in score else float("nan"),
        }
    return out


@dataclasses.dataclass
class AnchorReport:
    responses: int  # sampled
    well_formed: int  # scored (the others' steps do not line up with the statements)
    num_points: int  # N branch points per response
    chance: float  # the precision of a uniform choice among steps 2..S: pivots / (S - 1), averaged
    criteria: dict  # name -> {"precision": (mean, half-width of the 95% interval), "spearman": (...)}

    def table(self) -> str:
        lines = [
            f"{self.well_formed} of {self.responses} responses well-formed; N = {self.num_points} branch "
            f"steps each; a uniform choice among steps 2..S is a pivot {100 * self.chance:.1f}% of the time.",
            "",
            "| criterion | precision of the branch steps (pivots, %) | Spearman with reference counts |",
            "|---|---:|---:|",
        ]
        for name, v in self.criteria.items():
            p, r = v["precision"], v["spearman"]
            rho = "-" if np.isnan(r[0]) else f"{r[0]:+.2f} ({r[1]:.2f})"
            lines.append(f"| {name} | {100 * p[0]:.1f} ({100 * p[1]:.1f}) | {rho} |")
        lines.append("")
        lines.append("(mean over well-formed responses; 95% interval half-width in parentheses)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _mean_ci(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if not np.isnan(x)], np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(v.mean()), float(half)


def measure(sampler, problems, algo: AlgoConfig, *, samples: int = 2, seed: int = 0) -> AnchorReport:
    """Samples `samples` responses per problem (FCI on) and scores every well-formed one."""

    prompts = encode_problems(sampler, problems)
    groups = sampler.generate(prompts, n=samples, seed=seed)
    rng = np.random.default_rng(seed)
    rows, chance, total = [], [], 0
    for problem, prompt, group in zip(problems, prompts, groups):
        st = structure(problem.question)
        for sample in group:
            total += 1
            steps = sample_steps(sample, len(prompt))
            if not well_formed(sample.text, st) or steps.num_steps != st.steps:
                continue
            fci = np.asarray(sample.fci)[1 : steps.num_steps + 1]
            rows.append(response_scores(fci, sample.entropies, steps, st, algo, rng))
            chance.append(st.pivotal[2:].sum() / (st.steps - 1))
    criteria = {
        name: {k: _mean_ci([r[name][k] for r in rows]) for k in ("precision", "spearman")}
        for name in CRITERIA
    }
    return AnchorReport(
        total, len(rows), algo.atb.num_points, float(np.mean(chance)) if chance else 0.0, criteria
    )


def measure_checkpoint(c, checkpoint: str, eval_dir: str, problems: int, samples: int, seed: int = 0):
    """`measure` on a Hugging Face checkpoint with config `c`'s sampler and branching settings, over the
    first `problems` held-out problems of every level file in `eval_dir` (taken in turn, level by level)."""

    files = sorted(glob.glob(os.path.join(eval_dir, "*.parquet")))
    if not files:
        raise FileNotFoundError(f"no held-out problems (*.parquet) in {eval_dir}")
    levels = [read_verl_parquet(f) for f in files]
    pool = [p for group in itertools.zip_longest(*levels) for p in group if p is not None][:problems]
    cfg, params, tokenizer = load_checkpoint(checkpoint, attention_impl="xla", remat="none")
    sampler = Sampler(params, cfg, tokenizer, loop_settings(c))
    return measure(
        sampler, pool, AlgoConfig.attnrl().replace(atb=algo_config(c).atb), samples=samples, seed=seed
    )
