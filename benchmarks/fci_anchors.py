"""Does FCI find the anchors? `python -m benchmarks.fci_anchors [--problems 240] [--samples 2]`.

Prepares the `program` task (configs/program.py: data, tokenizer, warm start and its evaluation, shared with
the task comparison and resumed when already there), samples the warm-started policy on held-out problems
with the trainer's sampler settings (temperature 1, FCI on, the config's Delta and buckets), and prints
how well ATB (FCI), TreeRL's entropy and random choice pick the pivotal steps (`task.anchors`): precision
of the N branch steps and Spearman correlation of each score with the reference counts, with 95%
intervals over responses. Writes benchmarks/results/fci_anchors.json (small; commit it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/compare_program/shared")
    parser.add_argument("--problems", type=int, default=240, help="held-out problems (all levels)")
    parser.add_argument("--samples", type=int, default=2, help="responses per problem")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/fci_anchors.json")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from attnrl_jax.task import anchors, pipeline
    from configs import program

    c = program.get_config()
    c.workdir = args.workdir
    paths = pipeline.prepare(c)
    report = anchors.measure_checkpoint(
        c, paths["warm"], paths["eval_data"], args.problems, args.samples, args.seed
    )
    print(report.table())
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {"task": "program", "commit": commit, "checkpoint": "warm start", **report.to_dict()}
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.output)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
