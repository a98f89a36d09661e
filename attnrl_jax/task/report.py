"""The report of a built-in task run: PNG plots of the training metrics and an HTML page with the
evaluation before and after RL, sample responses whose steps are shaded by their FCI with the branch points
marked, and one prompt's tree with node values and advantages (ALGORITHM.md sections 5-8).

The page is XHTML (well-formed XML), so a plain XML parser validates it (tests/report_test.py).
"""

from __future__ import annotations

import html
import json
import os
import re

import numpy as np

from attnrl_jax.algo import AlgoConfig, RunningMean, build_prompt_trees
from attnrl_jax.algo.config import branch_points
from attnrl_jax.data import read_verl_parquet
from attnrl_jax.model.hf_io import load_checkpoint
from attnrl_jax.rewards import grade
from attnrl_jax.rollout import plan_branches, prompt_responses, sample_initial, sample_steps
from attnrl_jax.sampling import Sampler
from attnrl_jax.settings import algo_config, loop_settings
from attnrl_jax.task.anchors import measure_checkpoint


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (the last record of each step wins, as after a resume)."""
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def plot_metrics(records: list[dict], out_dir: str) -> list[str]:
    """Accuracy and reward against step and against wall-clock, valid-token ratio, prompt batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    step = np.array([r["step"] for r in records])
    get = lambda k: np.array([r.get(k, np.nan) if r.get(k) is not None else np.nan for r in records], float)  # noqa: E731
    minutes = np.cumsum(np.nan_to_num(get("time_step"))) / 60
    names = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=90)
        plt.close(fig)
        names.append(name)

    for x, label, name in (
        (step, "training step", "accuracy_step.png"),
        (minutes, "wall-clock (min)", "accuracy_time.png"),
    ):
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        ax.plot(x, get("accuracy"), marker=".", label="accuracy (initial responses)")
        ax.plot(x, get("reward"), marker=".", label="reward (2 acc - 1)")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, name)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(step, get("valid_token_ratio"), marker=".")
    ax.set_xlabel("training step")
    ax.set_ylabel("valid-token ratio")
    ax.grid(alpha=0.3)
    save(fig, "valid_tokens.png")
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(step, get("prompt_batch"), marker=".", label="prompt batch")
    ax.plot(step, get("num_paths"), marker=".", label="training paths")
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "batch_size.png")
    return names


# Characters XML 1.0 forbids (C0 controls other than tab/newline/CR, lone surrogates, U+FFFE/F): an
# untrained model's byte-level tokens can decode to them.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _text(tokenizer, tokens) -> str:
    text = tokenizer.decode(list(map(int, tokens)), skip_special_tokens=True)
    return html.escape(_NOT_XML.sub("\ufffd", text))


def fci_view(tokenizer, sample, steps, offsets, acc: float) -> str:
    """One response: each step a span shaded by its FCI (normalised to the response's maximum), a marker
    before each branch point."""
    fci = np.asarray(sample.fci, np.float64)[1 : steps.num_steps + 1]
    top = float(fci.max()) if len(fci) and fci.max() > 0 else 1.0
    marks = set(int(o) for o in offsets)
    parts = []
    for j in range(steps.num_steps):
        a, b = int(steps.bounds[j]), int(steps.bounds[j + 1])
        value = float(fci[j]) if j < len(fci) else 0.0
        if a in marks:
            parts.append('<span class="branch" title="branch point">&#9650;</span>')
        alpha = 0.08 + 0.8 * value / top
        parts.append(
            f'<span class="step" style="background: rgba(220, 60, 30, {alpha:.2f})" '
            f'title="step {j + 1}: FCI {value:.4f}">{_text(tokenizer, sample.tokens[a:b])}</span>'
        )
    verdict = "correct" if acc else "wrong"
    return f'<div class="response {verdict}"><div class="tag">{verdict}</div>{"".join(parts)}</div>'


def tree_view(tokenizer, prompt_text: str, responses, trees) -> str:
    """One prompt's tree: V(root), then per response its segments (V, A, leaves) and continuations."""
    out = [
        f"<p>Prompt: <code>{html.escape(prompt_text)}</code>; V(root) = {trees.root_value:.3f} over "
        f"{trees.num_leaves} leaves.</p>",
        "<ul>",
    ]
    for i, (r, t) in enumerate(zip(responses, trees.trees)):
        if t is None:
            out.append(
                f"<li>response {i + 1} (leaf, acc {r.acc:.0f}, not branched): "
                f'<span class="seg">{_text(tokenizer, r.tokens)}</span></li>'
            )
            continue
        out.append(f"<li>response {i + 1} (acc {r.acc:.0f}), branched at {list(map(int, t.cuts[1:-1]))}<ul>")
        for j in range(len(t.seg_values)):
            a, b = int(t.cuts[j]), int(t.cuts[j + 1])
            out.append(
                f"<li>segment {j}: V = {t.seg_values[j]:.3f}, A = {t.seg_advantages[j]:+.3f}, "
                f"leaves {int(t.seg_leaves[j])}: "
                f'<span class="seg">{_text(tokenizer, r.tokens[a:b])}</span></li>'
            )
        for c, adv, parent in zip(r.continuations, t.cont_advantages, t.cont_parent):
            out.append(
                f"<li>continuation from offset {c.offset} (under segment {int(parent)}): acc {c.acc:.0f}, "
                f'A = {adv:+.3f}: <span class="seg cont">{_text(tokenizer, c.tokens)}</span></li>'
            )
        out.append("</ul></li>")
    out.append("</ul>")
    return "\n".join(out)


def _duration(seconds: float) -> str:
    """A duration for people: "4.8 s", "3 min 12 s"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


def _count(n) -> str:
    return "no" if n is None else f"{int(n):,}"


def anchor_table(reports: dict) -> str:
    """XHTML table of `task.anchors.AnchorReport`s by policy: precision of each criterion's branch steps
    and the Spearman correlation of its score with the reference counts (95% half-widths)."""
    rows = []
    for policy, r in reports.items():
        for name, v in r.criteria.items():
            p, rho = v["precision"], v["spearman"]
            rho_cell = "-" if np.isnan(rho[0]) else f"{rho[0]:+.2f} &#177; {rho[1]:.2f}"
            p_cell = "-" if np.isnan(p[0]) else f"{100 * p[0]:.1f} &#177; {100 * p[1]:.1f}"
            rows.append(
                f"<tr><td>{html.escape(policy)}</td><td>{name}</td><td>{p_cell}</td><td>{rho_cell}</td>"
                f"<td>{r.well_formed} / {r.responses}</td>"
                f"<td>{100 * r.chance:.1f}</td></tr>"
            )
    return (
        "<table><tr><th>policy</th><th>criterion</th><th>branch steps that are pivots (%)</th>"
        "<th>Spearman with reference counts</th><th>well-formed responses</th><th>chance (%)</th></tr>"
        + "".join(rows)
        + "</table><p>Mean and 95% interval over well-formed responses (2 per problem); chance: a uniform "
        "choice among steps 2..S.</p>"
    )


def eval_table(before: dict | None, after: dict | None) -> str:
    if before is None or after is None:
        return "<p>(evaluation results missing)</p>"
    rows = [
        "<table><tr><th>benchmark</th><th>avg@k before</th><th>avg@k after</th>"
        "<th>pass@k before</th><th>pass@k after</th></tr>"
    ]
    for name in before["benchmarks"]:
        b, a = before["benchmarks"][name], after["benchmarks"].get(name, {})
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{100 * b['avg@k']:.1f}%</td>"
            f"<td>{100 * a.get('avg@k', np.nan):.1f}%</td>"
            f"<td>{100 * b['pass@k']:.1f}%</td><td>{100 * a.get('pass@k', np.nan):.1f}%</td></tr>"
        )
    b, a = before["mean"], after["mean"]
    rows.append(
        f"<tr><th>mean</th><th>{100 * b['avg@k']:.1f}%</th><th>{100 * a['avg@k']:.1f}%</th>"
        f"<th>{100 * b['pass@k']:.1f}%</th><th>{100 * a['pass@k']:.1f}%</th></tr></table>"
    )
    return "\n".join(rows)


STYLE = """
body { font-family: sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
.response { font-family: monospace; white-space: pre-wrap; border: 1px solid #ddd; padding: 6px;
  margin: 8px 0; }
.response.correct { border-left: 5px solid #3a3; } .response.wrong { border-left: 5px solid #c33; }
.tag { font-family: sans-serif; font-size: 80%; color: #666; }
.branch { color: #06c; font-weight: bold; } .seg { font-family: monospace; white-space: pre-wrap; }
.cont { color: #555; } img { margin: 4px; border: 1px solid #eee; }
"""


def write_report(workdir: str, config, policy_dir: str, *, samples: int = 4, seed: int = 0) -> str:
    """Writes <workdir>/report/index.html (and its PNGs) for the run in config.workdir; returns its path.

    `config` is the RL run's config (algorithm and sampler settings); `policy_dir` the Hugging Face
    checkpoint whose responses are shown."""

    out_dir = os.path.join(workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    records = read_metrics(os.path.join(config.workdir, "metrics.jsonl"))
    plots = plot_metrics(records, out_dir)

    cfg, params, tokenizer = load_checkpoint(policy_dir, attention_impl="xla", remat="none")
    algo = algo_config(config)
    sampler = Sampler(params, cfg, tokenizer, loop_settings(config))
    problems = read_verl_parquet(config.data.train_path)[: max(samples, 8)]
    score = lambda texts, gts: [grade(t, g).acc for t, g in zip(texts, gts)]  # noqa: E731

    # Sample responses with FCI; ATB's branch points (the FCI criterion, whatever the run's method).
    batch = sample_initial(sampler, problems[:samples], 1, score, seed=seed)
    atb = AlgoConfig.attnrl().replace(atb=algo.atb)
    rng = np.random.default_rng(seed)
    views = []
    for q, group in enumerate(batch.samples):
        s = group[0]
        steps = sample_steps(s, len(batch.prompts[q]))
        fci = np.asarray(s.fci)[1 : steps.num_steps + 1]
        offsets = branch_points(atb, steps, fci=fci, entropy=s.entropies, rng=rng)
        question, answer = html.escape(problems[q].question), html.escape(str(problems[q].ground_truth))
        views.append(
            f"<h3>{question} (answer {answer})</h3>"
            + fci_view(tokenizer, s, steps, offsets, batch.accs()[q, 0])
        )

    # One prompt's tree: the first problem whose plan branches something.
    tree_html = "<p>(no prompt was branched in the problems tried)</p>"
    tree_algo = algo if algo.estimator != "grpo" else AlgoConfig.attnrl().replace(group_size=algo.group_size)
    for i, problem in enumerate(problems):
        initial = sample_initial(sampler, [problem], tree_algo.group_size, score, seed=seed + 100 + i)
        branch = plan_branches(initial, tree_algo, RunningMean(), np.random.default_rng(seed + i))
        if not branch.requests:
            continue
        conts = sampler.sample_mixed([], 0, branch.requests, seed=seed + 200 + i)[1]
        flat = [c for per_req in conts for group in per_req for c in group]
        cont_accs = score([c.text for c in flat], [problem.ground_truth] * len(flat))
        responses = prompt_responses(initial, branch, conts, cont_accs)[0]
        tree_html = tree_view(tokenizer, problem.question, responses, build_prompt_trees(responses))
        break

    # The program task: how well each criterion finds the pivotal steps, before and after RL.
    family = config.task.get("family", "arith") if "task" in config else "arith"
    anchors_html = ""
    if family == "program":
        eval_data = os.path.join(workdir, "data", "eval")
        n = config.task.get("anchor_problems", 60)
        found = {
            name: measure_checkpoint(config, ckpt, eval_data, n, 2, seed)
            for name, ckpt in (("warm start", config.model.hf_path), ("after RL", policy_dir))
        }
        anchors_html = (
            "<h2>Does FCI find the anchors? (pivotal steps of held-out responses)</h2>" + anchor_table(found)
        )

    def load(name):
        path = os.path.join(workdir, "eval", f"{name}.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    images = "\n".join(f'<img src="{p}" alt="{p}" />' for p in plots)
    last = records[-1] if records else {}
    mode = "one-step off-policy" if config.train.off_policy else "on-policy"
    page = f"""<?xml version="1.0" encoding="utf-8"?>
<!DOCTYPE html>
<html xmlns="http://www.w3.org/1999/xhtml" lang="en">
<head><meta charset="utf-8" /><title>AttnRL on the built-in task</title><style>{STYLE}</style></head>
<body>
<h1>AttnRL on the built-in {"program" if family == "program" else "arithmetic-chain"} task</h1>
<p>Method: <b>{html.escape(config.algo.preset)}</b>, {mode},
{len(records)} training steps in {_duration(sum(r.get("time_step") or 0.0 for r in records))}
({_duration(last.get("time_step") or 0.0)} for the last one), {_count(last.get("total_generated_tokens"))}
generated tokens.</p>
<h2>Evaluation before and after RL (held-out problems, by number of steps)</h2>
{eval_table(load("warm"), load("final"))}
{anchors_html}
<h2>Training curves</h2>
{images}
<h2>Sample responses: steps shaded by FCI, &#9650; marks ATB's branch points</h2>
<p>Darker steps receive more attention from the steps that follow them (Forward Context Influence,
section 5); branching happens at the earliest high-FCI steps (section 6).</p>
{"".join(views)}
<h2>One prompt's tree: Monte Carlo values V and advantages A (section 8)</h2>
{tree_html}
</body></html>
"""
    path = os.path.join(out_dir, "index.html")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
