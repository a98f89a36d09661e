"""The task report's figures (matplotlib, Agg): held-out accuracy during training, the training samples'
and the optimisation's curves, the step x step attention of one response, FCI by step position, the FCI
filter's drop rate, and one prompt's tree drawn with V and A on its segments. Each function takes plain
arrays or records and writes one PNG; `attnrl_jax/task/report.py` lays them out.

matplotlib is imported inside `_plt` (backend first; it is a report-only dependency, about 0.5 s).
"""

from __future__ import annotations

import os

import numpy as np

DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return os.path.basename(path)


def series(records: list[dict], key: str) -> np.ndarray:
    """One metric over the records (nan where a step has none)."""
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in records], np.float64)


def heldout_curve(records: list[dict], before: dict | None, after: dict | None, path: str) -> str | None:
    """Held-out avg@k (mean over levels, and each level) against training step and generated tokens,
    from the trainer's `heldout/*` records, with the warm start at step 0 and the final evaluation."""
    marks = [r for r in records if "heldout/avg@k" in r]
    if not marks:
        return None
    plt = _plt()
    steps = np.array([r["step"] for r in marks], float)
    tokens = np.array([r.get("total_generated_tokens", np.nan) for r in marks], float) / 1e3
    mean = 100 * np.array([r["heldout/avg@k"] for r in marks])
    levels = sorted({k.split("/")[1] for r in marks for k in r if k.endswith("/avg@k") and k.count("/") == 2})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, x, label in (
        (axes[0], steps, "training step"),
        (axes[1], tokens, "generated tokens (thousands)"),
    ):
        x0 = np.concatenate([[0.0], x])
        start = 100 * before["mean"]["avg@k"] if before else np.nan
        ax.plot(x0, np.concatenate([[start], mean]), "o-", color="C0", lw=2, label="mean over levels")
        for i, name in enumerate(levels):
            first = (
                100 * before["benchmarks"][name]["avg@k"]
                if before and name in before["benchmarks"]
                else np.nan
            )
            ys = 100 * np.array([r.get(f"heldout/{name}/avg@k", np.nan) for r in marks])
            ax.plot(x0, np.concatenate([[first], ys]), "-", lw=1, alpha=0.6, color=f"C{i + 1}", label=name)
        if after:
            ax.plot([x[-1]], [100 * after["mean"]["avg@k"]], "*", ms=12, color="k", label="final evaluation")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"held-out avg@{int(marks[0].get('heldout/k', 0))} (%)")
    axes[0].set_title("Held-out accuracy during training (step 0: warm start)", fontsize=10)
    axes[1].set_title("... against the sampling budget", fontsize=10)
    axes[1].legend(fontsize=7, loc="best")
    return _save(fig, path)


def _grid(records, panels, path, title):
    plt = _plt()
    step = series(records, "step")
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.9 * rows), squeeze=False)
    for ax, (keys, name, ylabel) in zip(axes.flat, panels):
        for j, (key, label) in enumerate(keys):
            ax.plot(step, series(records, key), ".-", color=f"C{j}", label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def training_curves(records: list[dict], path: str) -> str:
    """What the sampler saw: accuracy and reward of the initial responses, continuations' accuracy, token
    entropy, response length, prompts and paths per step."""
    panels = [
        ([("accuracy", "initial"), ("continuation_accuracy", "continuations")], "Sample accuracy", "acc."),
        ([("reward", "reward")], "Reward (2 acc - 1)", "reward"),
        ([("entropy", "entropy")], "Token entropy where sampled", "nats / token"),
        ([("response_length", "response length")], "Initial response length", "tokens"),
        ([("prompt_batch", "prompts"), ("num_paths", "training paths")], "Batch", "count"),
        ([("tokens_per_s", "tokens / s")], "Sampling throughput", "tokens / s"),
    ]  # fmt: skip
    return _grid(records, panels, path, "Training samples")


def optimisation_curves(records: list[dict], path: str) -> str:
    """The update's own curves: loss and its policy-gradient part, KL to the reference, clip fraction,
    gradient norm, importance ratio and (with recomputed log-probs) the behaviour log-prob mismatch."""
    panels = [
        ([("update/loss", "loss"), ("update/pg_loss", "policy-gradient part")], "Loss", "loss"),
        ([("update/kl", "k3 KL")], "KL to the reference", "KL"),
        ([("update/clip_frac", "clip fraction")], "Clipped tokens", "fraction"),
        ([("update/grad_norm", "gradient norm")], "Gradient norm (before clipping)", "norm"),
        ([("update/ratio", "ratio")], "Importance ratio pi / pi_old", "mean ratio"),
    ]
    if any("update/logp_mismatch" in r for r in records):
        panels.append(([("update/logp_mismatch", "|log p - log p_old|")], "Log-prob mismatch", "nats"))
    return _grid(records, panels, path, "Optimisation")


def drop_rate(records: list[dict], path: str) -> str:
    """The FCI filter at work: of the all-correct prompts of each step, the share it dropped (and how many
    all-correct prompts there were), section 7."""
    plt = _plt()
    step = series(records, "step")
    easy, dropped, batch = (
        series(records, k) for k in ("prompts_all_correct", "prompts_dropped_fci", "prompt_batch")
    )
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    with np.errstate(invalid="ignore", divide="ignore"):
        a.plot(step, 100 * dropped / easy, "o-", label="dropped / all-correct")
        a.plot(step, 100 * dropped / batch, "s--", label="dropped / all prompts")
    a.set_ylim(-5, 105)
    a.set_ylabel("%")
    a.set_title("FCI filter's drop rate", fontsize=10)
    a.legend(fontsize=7)
    b.bar(step, easy, color="C2", alpha=0.6, label="all-correct prompts")
    b.bar(step, dropped, color="C3", alpha=0.8, label="dropped by the filter")
    b.set_title("Counts per step", fontsize=10)
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def attention_map(steps_attention: np.ndarray, fci: np.ndarray, delta: int, path: str) -> str:
    """One response's step x step attention: the head whose FCI column sums are largest, and the mean
    over all layers and heads, each with its colour scale; the dashed line is a = c + Delta, below which
    the attention counts toward column c's FCI (drawn above as bars)."""
    plt = _plt()
    m = np.asarray(steps_attention, np.float64)  # [L, N, C, C]
    c_n = m.shape[-1]
    sums = np.stack([m[..., c + delta :, c].sum(-1) for c in range(c_n)], -1)  # [L, N, C]
    layer, head = np.unravel_index(np.argmax(sums.max(-1)), sums.shape[:2])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.9), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for ax, img, title in (
        (axes[0], m[layer, head], f"layer {layer + 1}, head {head + 1} (the largest FCI)"),
        (axes[1], m.mean(axis=(0, 1)), "mean over layers and heads"),
    ):
        shown = ax.imshow(img, cmap="magma", origin="upper")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="mean attention, token to token")
        ax.plot([-0.5, c_n - 0.5 - delta], [delta - 0.5, c_n - 0.5], "--", color="cyan", lw=1)
        ax.set_xlabel("attended step c (0: prompt)")
        ax.set_ylabel("attending step a")
        ax.set_title(title, fontsize=9)
    axes[2].bar(np.arange(len(fci)), fci, color="C3")
    axes[2].set_xlabel("step (0: prompt)")
    axes[2].set_ylabel("FCI")
    axes[2].set_title(f"FCI of each step (Delta = {delta})", fontsize=9)
    axes[2].grid(alpha=0.3)
    return _save(fig, path)


def fci_by_position(fcis: list[np.ndarray], path: str) -> str | None:
    """FCI against step position over many responses: each response's FCI divided by its maximum, as a
    heat map (response x step, with its colour scale) and as the mean with a 95% interval per position."""
    rows = [np.asarray(f, np.float64) for f in fcis if len(f) and np.max(f) > 0]
    if not rows:
        return None
    plt = _plt()
    width = max(len(f) for f in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, f in enumerate(rows):
        grid[i, : len(f)] = f / f.max()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    shown = a.imshow(grid, aspect="auto", cmap="Reds", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=a, label="FCI / response's maximum")
    a.set_xticks(range(width), [str(j + 1) for j in range(width)], fontsize=7)
    a.set_xlabel("step")
    a.set_ylabel("response")
    a.set_title(f"FCI of {len(rows)} sampled responses", fontsize=10)
    n = np.sum(~np.isnan(grid), axis=0)
    mean = np.nanmean(grid, axis=0)
    half = np.array(
        [1.96 * np.nanstd(col, ddof=1) / np.sqrt(m) if m > 1 else 0.0 for col, m in zip(grid.T, n)]
    )
    x = np.arange(1, width + 1)
    b.errorbar(x, mean, yerr=half, fmt="o-", capsize=3)
    for xi, ni, yi in zip(x, n, mean):
        b.annotate(f"n={ni}", (xi, yi), textcoords="offset points", xytext=(0, 8), fontsize=6, ha="center")
    b.set_xlabel("step")
    b.set_ylabel("mean FCI / maximum (95% interval)")
    b.set_title("FCI by step position", fontsize=10)
    b.grid(alpha=0.3)
    return _save(fig, path)


def tree_figure(responses, trees, path: str) -> str:
    """One prompt's tree drawn: each initial response a horizontal chain of segments split at its branch
    points, each segment labelled with its Monte Carlo value V and advantage A and coloured by A; each
    continuation a branch from its cut to its end, coloured by its leaf's A, ending in a tick (correct) or
    a cross; V(root) at the left."""
    plt = _plt()
    import matplotlib
    from matplotlib import cm, colors

    advantages = [a for t in trees.trees if t is not None for a in [*t.seg_advantages, *t.cont_advantages]]
    lim = max([1.0] + [abs(float(a)) for a in advantages])
    norm = colors.TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim)
    cmap = matplotlib.colormaps["coolwarm_r"]
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.95 * len(responses)))
    y = 0.0
    longest = max([len(r.tokens) for r in responses] + [1])
    for i, (r, t) in enumerate(zip(responses, trees.trees)):
        y -= 1.0
        ax.plot([-0.06 * longest, 0], [-(len(responses) + 1) / 2, y], color="0.6", lw=0.8)
        if t is None:
            ax.plot([0, len(r.tokens)], [y, y], color="0.5", lw=3)
            ax.text(len(r.tokens) / 2, y + 0.12, "not branched", ha="center", fontsize=7, color="0.3")
        else:
            for j in range(len(t.seg_values)):
                a, b = int(t.cuts[j]), int(t.cuts[j + 1])
                ax.plot([a, b], [y, y], color=cmap(norm(t.seg_advantages[j])), lw=5, solid_capstyle="butt")
                ax.text(
                    (a + b) / 2, y + 0.14, f"V={t.seg_values[j]:.2f}  A={t.seg_advantages[j]:+.2f}",
                    ha="center", fontsize=7,
                )  # fmt: skip
                if j:
                    ax.plot([a], [y], "o", color="k", ms=4)
            for c, adv in zip(r.continuations, t.cont_advantages):
                end = c.offset + len(c.tokens)
                ax.plot([c.offset, end], [y, y - 0.42], color=cmap(norm(adv)), lw=2)
                mark = "\u2713" if c.acc else "\u2717"
                ax.text(end, y - 0.42, f" {mark} A={adv:+.2f}", va="center", fontsize=6,
                        color="green" if c.acc else "red")  # fmt: skip
        ax.text(len(r.tokens), y, " \u2713" if r.acc else " \u2717", va="center", fontsize=10,
                color="green" if r.acc else "red")  # fmt: skip
        ax.text(-0.01 * longest, y + 0.14, f"response {i + 1}", ha="right", fontsize=7)
    ax.plot([-0.06 * longest], [-(len(responses) + 1) / 2], "s", color="k", ms=8)
    root = f"V(root) = {trees.root_value:.2f}\n{trees.num_leaves} leaves"
    ax.text(-0.07 * longest, -(len(responses) + 1) / 2, root, ha="right", va="center", fontsize=8)
    ax.set_xlim(-0.3 * longest, longest * 1.18)
    ax.set_ylim(y - 0.8, 0.3)
    ax.set_yticks([])
    ax.set_xlabel("token position in the response (branch points: black dots)")
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="advantage A", fraction=0.03, pad=0.01)
    ax.set_title(
        "One prompt's tree: Monte Carlo values V and advantages A of every segment and leaf", fontsize=10
    )
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    return _save(fig, path)
