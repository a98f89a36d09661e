"""The report of a built-in task run: one XHTML page a researcher can send a colleague, with the run's
identity (method, seeds, commit, command, changes from the shipped config), the held-out evaluation before
and after RL with n and 95% intervals, held-out accuracy during training, the training samples' and the
optimisation's curves, FCI pictures with colour scales (one response's step x step attention, FCI by step
position, the filter's drop rate, responses shaded by FCI with ATB's branch points) and one prompt's tree
drawn with V and A (docs/algorithm.md sections 5-8). The figures are `report_figures.py`'s.

The page is XHTML (well-formed XML), so a plain XML parser validates it (tests/report_test.py).
"""

from __future__ import annotations

import html
import json
import os
import re

import jax.numpy as jnp
import numpy as np

from attnrl_jax.algo import AlgoConfig, RunningMean, build_prompt_trees
from attnrl_jax.algo.config import branch_points, method_label
from attnrl_jax.data import read_verl_parquet
from attnrl_jax.evaluation import interval95, mean_interval95
from attnrl_jax.model.forward import step_attention
from attnrl_jax.model.hf_io import load_checkpoint
from attnrl_jax.rewards import grade
from attnrl_jax.rollout import plan_branches, prompt_responses, sample_initial, sample_steps
from attnrl_jax.sampling import Sampler
from attnrl_jax.settings import algo_config, loop_settings
from attnrl_jax.task import report_figures
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


def _pct(value: float, half: float) -> str:
    if np.isnan(value):
        return "-"
    return f"{100 * value:.1f}" + ("" if np.isnan(half) else f" &#177; {100 * half:.1f}")


def _cell(key: str, value: float, text: str, step: int | None = None) -> str:
    """A table cell whose number a test can read back (`data-key`, `data-value`, optional `data-step`)."""
    at = "" if step is None else f' data-step="{step}"'
    return f'<td data-key="{html.escape(key)}"{at} data-value="{value!r}">{text}</td>'


def eval_table(before: dict | None, after: dict | None) -> str:
    """Held-out avg@k and pass@k per level before and after RL, each with its 95% interval over problems
    (`evaluation.interval95`) and the number of problems n and samples k it rests on."""
    if before is None or after is None:
        return "<p>(evaluation results missing)</p>"
    rows = [
        "<table><tr><th>benchmark</th><th>n</th><th>k</th><th>avg@k before (%)</th><th>avg@k after (%)</th>"
        "<th>change (points)</th><th>pass@k before (%)</th><th>pass@k after (%)</th></tr>"
    ]

    def row(name, b, a, mean=False):
        get = (lambda r, m: mean_interval95(r, m)) if mean else (lambda r, m: interval95(r, m))
        b_avg, a_avg = get(b, "avg@k"), get(a, "avg@k")
        b_pass, a_pass = get(b, "pass@k"), get(a, "pass@k")
        n = sum(r["problems"] for r in b["benchmarks"].values()) if mean else b["problems"]
        k = next(iter(b["benchmarks"].values()))["k"] if mean else b["k"]
        tag = "mean" if mean else name
        return (
            f"<tr><td>{html.escape(tag)}</td><td>{n}</td><td>{k}</td>"
            + _cell(f"eval/warm/{tag}/avg@k", b_avg[0], _pct(*b_avg))
            + _cell(f"eval/final/{tag}/avg@k", a_avg[0], _pct(*a_avg))
            + f"<td>{100 * (a_avg[0] - b_avg[0]):+.1f}</td>"
            + _cell(f"eval/warm/{tag}/pass@k", b_pass[0], _pct(*b_pass))
            + _cell(f"eval/final/{tag}/pass@k", a_pass[0], _pct(*a_pass))
            + "</tr>"
        )

    for name, b in before["benchmarks"].items():
        a = after["benchmarks"].get(name)
        if a is not None:
            rows.append(row(name, b, a))
    rows.append(row("mean", before, after, mean=True))
    rows.append("</table>")
    rows.append(
        '<p class="note">&#177;: 95% interval over the n problems (1.96 standard errors of the per-problem '
        "accuracy; the mean row combines the levels' as independent). Each problem has k samples at "
        "the evaluation temperature.</p>"
    )
    return "\n".join(rows)


def _number(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) >= 1000 else f"{x:.4g}"


def metrics_table(records: list[dict]) -> str:
    """The last step's key numbers and every held-out mark, read from metrics.jsonl."""
    if not records:
        return "<p>(no training records)</p>"
    last = records[-1]
    keys = [
        ("accuracy", "training-sample accuracy"),
        ("entropy", "token entropy (nats)"),
        ("update/loss", "loss"),
        ("update/kl", "KL to the reference"),
        ("update/clip_frac", "clip fraction"),
        ("update/grad_norm", "gradient norm"),
        ("num_paths", "training paths"),
        ("total_generated_tokens", "generated tokens (total)"),
    ]
    cells = [
        f"<tr><td>{label}</td>{_cell(key, float(last[key]), _number(last[key]), last['step'])}</tr>"
        for key, label in keys
        if last.get(key) is not None
    ]
    out = [f"<table><tr><th>at step {last['step']}</th><th>value</th></tr>{''.join(cells)}</table>"]
    marks = [r for r in records if "heldout/avg@k" in r]
    if marks:
        out.append(
            "<table><tr><th>held-out mark: step</th><th>generated tokens</th><th>problems (n)</th><th>k</th>"
            "<th>avg@k (%)</th><th>pass@k (%)</th></tr>"
        )
        for r in marks:
            out.append(
                f"<tr><td>{r['step']}</td><td>{int(r.get('total_generated_tokens', 0)):,}</td>"
                f"<td>{int(sum(v for k, v in r.items() if k.endswith('/problems')))}</td>"
                f"<td>{int(r.get('heldout/k', 0))}</td>"
                + _cell("heldout/avg@k", r["heldout/avg@k"], f"{100 * r['heldout/avg@k']:.1f}", r["step"])
                + _cell("heldout/pass@k", r["heldout/pass@k"], f"{100 * r['heldout/pass@k']:.1f}", r["step"])
                + "</tr>"
            )
        out.append("</table>")
    return "\n".join(out)


def identity_table(work: str, config, records: list[dict]) -> str:
    """Who ran what: method, pipeline, seeds, the commits and commands of each invocation (runs.jsonl),
    and the run's difference from its config file (the overrides given)."""
    runs = []
    path = os.path.join(work, "runs.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            runs = [json.loads(line) for line in f if line.strip()]
    mode = "one-step off-policy" if config.train.off_policy else "on-policy (two sampler calls per step)"
    tokens = _count(records[-1].get("total_generated_tokens") if records else 0)
    spent = _duration(sum(r.get("time_step") or 0.0 for r in records))
    preset = config.algo.preset
    rows = [
        ("method", f"{html.escape(method_label(preset))} (config.algo.preset={preset})"),
        ("pipeline", mode),
        ("seeds", f"task data and warm start {config.task.seed}; sampling and RL {config.seed}"),
        ("training", f"{len(records)} steps, {tokens} generated tokens, {spent}"),
        ("workdir", html.escape(work)),
    ]
    if runs:
        first, latest = runs[0], runs[-1]
        overrides = latest.get("overrides") or []
        rows += [
            ("config file", f"<code>{html.escape(str(latest.get('config')))}</code>"),
            (
                "changed from it",
                "<br />".join(f"<code>{html.escape(o)}</code>" for o in overrides) or "nothing (as shipped)",
            ),
            ("commit", html.escape(", ".join(dict.fromkeys(r.get("commit", "?") for r in runs)))),
            ("invocations", f"{len(runs)}: first {first.get('time')}, latest {latest.get('time')}"),
            ("host", html.escape(str(latest.get("host")))),
            (
                "versions",
                html.escape(", ".join(f"{k} {v}" for k, v in (latest.get("versions") or {}).items())),
            ),
        ]
    body = "".join(f'<tr><th>{k}</th><td class="left">{v}</td></tr>' for k, v in rows)
    return f'<table class="identity">{body}</table>'


STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 3px; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 6px 0; } td, th { border: 1px solid #ccc; padding: 3px 8px;
  text-align: right; } td.left { text-align: left; } table.identity th { text-align: left; }
.note { color: #555; font-size: 85%; }
.response { font-family: monospace; white-space: pre-wrap; border: 1px solid #ddd; padding: 6px;
  margin: 8px 0; }
.response.correct { border-left: 5px solid #3a3; } .response.wrong { border-left: 5px solid #c33; }
.tag { font-family: sans-serif; font-size: 80%; color: #666; }
.branch { color: #06c; font-weight: bold; } .seg { font-family: monospace; white-space: pre-wrap; }
.cont { color: #555; } img { margin: 4px 0; border: 1px solid #eee; max-width: 100%; height: auto; }
.scale { display: inline-block; width: 220px; height: 12px; vertical-align: middle; border: 1px solid #ccc;
  background: linear-gradient(to right, rgba(220, 60, 30, 0.08), rgba(220, 60, 30, 0.88)); }
.wide { overflow-x: auto; }
"""


def _figure(name: str | None, alt: str) -> str:
    return "" if name is None else f'<p><img src="{name}" alt="{html.escape(alt)}" /></p>'


def _responses_with_fci(sampler, problems, score, atb, seed: int):
    """One sampled response per problem with its steps and ATB's branch points (the FCI criterion)."""
    batch = sample_initial(sampler, problems, 1, score, seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    for q, group in enumerate(batch.samples):
        s = group[0]
        steps = sample_steps(s, len(batch.prompts[q]))
        fci = np.asarray(s.fci)[1 : steps.num_steps + 1]
        offsets = branch_points(atb, steps, fci=fci, entropy=s.entropies, rng=rng)
        out.append((problems[q], batch.prompts[q], s, steps, fci, offsets, batch.accs()[q, 0]))
    return out


def _attention_figure(params, cfg, shown, delta: int, out_dir: str) -> str | None:
    """The step x step attention map of the first shown response with at least Delta + 2 steps."""
    for _, prompt, s, steps, fci, _, _ in shown:
        if steps.num_steps >= delta + 2:
            ids = np.concatenate(
                [np.zeros(len(prompt), np.int32), np.asarray(s.step_ids[: steps.bounds[-1]])]
            )
            tokens = np.concatenate([np.asarray(prompt), np.asarray(s.tokens[: steps.bounds[-1]])]).astype(
                np.int32
            )
            m = step_attention(params, jnp.asarray(tokens[None]), jnp.asarray(ids[None]), cfg=cfg)
            m = np.asarray(m)[:, 0]
            full = np.concatenate([[0.0], np.asarray(fci, np.float64)])
            return report_figures.attention_map(m, full, delta, os.path.join(out_dir, "attention_map.png"))
    return None


def write_report(workdir: str, config, policy_dir: str, *, samples: int = 4, seed: int = 0) -> str:
    """Writes <workdir>/report/index.html (and its PNGs) for the run in config.workdir; returns its path.

    `config` is the RL run's config (algorithm and sampler settings); `policy_dir` the Hugging Face
    checkpoint whose responses are shown. The page: the run's identity, the held-out evaluation before and
    after (n, k, 95% intervals), held-out accuracy during training, the training samples' and the
    optimisation's curves, FCI pictures (one response's step x step attention, FCI by step position, the
    filter's drop rate, responses shaded by FCI) and one prompt's tree drawn with V and A."""

    out_dir = os.path.join(workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    records = read_metrics(os.path.join(config.workdir, "metrics.jsonl"))

    def load(name):
        path = os.path.join(workdir, "eval", f"{name}.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    before, after = load("warm"), load("final")
    figure = lambda name: os.path.join(out_dir, name)  # noqa: E731
    heldout_png = report_figures.heldout_curve(records, before, after, figure("heldout.png"))
    training_png = report_figures.training_curves(records, figure("training.png")) if records else None
    optim_png = report_figures.optimisation_curves(records, figure("optimisation.png")) if records else None
    drop_png = report_figures.drop_rate(records, figure("fci_filter.png")) if records else None

    cfg, params, tokenizer = load_checkpoint(policy_dir, attention_impl="xla", remat="none")
    algo = algo_config(config)
    sampler = Sampler(params, cfg, tokenizer, loop_settings(config))
    problems = read_verl_parquet(config.data.train_path)
    score = lambda texts, gts: [grade(t, g).acc for t, g in zip(texts, gts)]  # noqa: E731
    atb = AlgoConfig.attnrl().replace(atb=algo.atb)

    # Responses with their FCI (ATB's branch points: the FCI criterion, whatever the run's method): the
    # first `samples` shown, 8 times as many (32 at the shipped 4) for FCI by position.
    sampled = _responses_with_fci(sampler, problems[: 8 * max(samples, 1)], score, atb, seed)
    shown = sampled[:samples]
    views = [
        f"<h3>{html.escape(p.question)} (answer {html.escape(str(p.ground_truth))})</h3>"
        + fci_view(tokenizer, s, steps, offsets, acc)
        for p, _, s, steps, _, offsets, acc in shown
    ]
    position_png = report_figures.fci_by_position([f for *_, f, _, _ in sampled], figure("fci_position.png"))
    attention_png = _attention_figure(params, cfg, sampled, config.algo.fci_delta, out_dir)

    # One prompt's tree: the first problem whose plan branches something.
    tree_html, tree_png = "<p>(no prompt was branched in the problems tried)</p>", None
    tree_algo = algo if algo.estimator != "grpo" else AlgoConfig.attnrl().replace(group_size=algo.group_size)
    for i, problem in enumerate(problems[:8]):
        initial = sample_initial(sampler, [problem], tree_algo.group_size, score, seed=seed + 100 + i)
        branch = plan_branches(initial, tree_algo, RunningMean(), np.random.default_rng(seed + i))
        if not branch.requests:
            continue
        conts = sampler.sample_mixed([], 0, branch.requests, seed=seed + 200 + i)[1]
        flat = [c for per_req in conts for group in per_req for c in group]
        cont_accs = score([c.text for c in flat], [problem.ground_truth] * len(flat))
        responses = prompt_responses(initial, branch, conts, cont_accs)[0]
        trees = build_prompt_trees(responses)
        tree_png = report_figures.tree_figure(responses, trees, figure("tree.png"))
        tree_html = (
            f"<p>Prompt: <code>{html.escape(problem.question)}</code></p>"
            + _figure(tree_png, "the tree drawn")
            + "<details><summary>The same tree with each segment's text</summary>"
            + tree_view(tokenizer, problem.question, responses, trees)
            + "</details>"
        )
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

    heldout_html = _figure(heldout_png, "held-out accuracy against step and generated tokens") or (
        "<p>(no held-out marks: config.heldout.every is 0)</p>"
    )
    method = html.escape(method_label(config.algo.preset))
    task_name = "program" if family == "program" else "arithmetic-chain"
    k = before["benchmarks"][next(iter(before["benchmarks"]))]["k"] if before else "k"
    page = f"""<?xml version="1.0" encoding="utf-8"?>
<!DOCTYPE html>
<html xmlns="http://www.w3.org/1999/xhtml" lang="en">
<head><meta charset="utf-8" /><meta name="viewport" content="width=device-width, initial-scale=1" />
<title>{method} on the built-in {task_name} task</title><style>{STYLE}</style></head>
<body>
<h1>{method} on the built-in {task_name} task</h1>
{identity_table(workdir, config, records)}
<h2>Held-out evaluation before and after RL (avg@{k}, pass@{k})</h2>
<div class="wide">{eval_table(before, after)}</div>
<h2>Held-out accuracy during training</h2>
{heldout_html}
<div class="wide">{metrics_table(records)}</div>
{anchors_html}
<h2>Optimisation</h2>
{_figure(optim_png, "loss, KL, clip fraction, gradient norm, ratio")}
<h2>Training samples</h2>
{_figure(training_png, "training-sample accuracy, reward, entropy, length, batch")}
<h2>FCI: which steps later steps attend to (section 5)</h2>
<p>One response's attention between its steps: a step's FCI sums the attention it receives from steps at least
Delta = {config.algo.fci_delta} later (below the dashed line), maximised over layers and heads.</p>
{_figure(attention_png, "step x step attention of one response")}
{_figure(position_png, "FCI by step position")}
<p>The FCI filter (section 7) drops all-correct prompts whose mean FCI is below the running mean:</p>
{_figure(drop_png, "the FCI filter's drop rate")}
<h2>Sample responses: steps shaded by FCI, &#9650; marks ATB's branch points</h2>
<p>Shade: a step's FCI relative to the response's largest, from 0 <span class="scale"></span> to the maximum
(hover a step for its value). Branching happens at the earliest high-FCI steps (section 6).</p>
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
