"""Learning curves and adaptation curves as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np

from metarl_jax.run_dir import load_run_config, read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _group_runs(run_dirs):
    """Runs that differ only in their seed form one group (one curve, seeds spread)."""
    groups = defaultdict(list)
    for run_dir in run_dirs:
        config = load_run_config(run_dir).to_dict()
        config.pop("seed")
        for key in ("iterations", "checkpoint_every", "keep_checkpoints", "logger",
                    "debug_nan_at_iteration", "sweep_batch"):
            config.pop(key, None)
        groups[repr(sorted((k, repr(v)) for k, v in config.items()))].append(run_dir)
    return list(groups.values())


def _flat(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, prefix + key + "."))
        else:
            flat[prefix + key] = value
    return flat


def _label(run_dirs, all_groups):
    def name(group):
        config = load_run_config(group[0]).to_dict()
        return f"{config['algo']} on {config['env']['name']}"

    label = name(run_dirs)
    same_name = [g for g in all_groups if name(g) == label]
    if len(same_name) > 1:  # same algo and env twice: name the settings that differ
        settings = [_flat(load_run_config(g[0]).to_dict()) for g in same_name]
        own = _flat(load_run_config(run_dirs[0]).to_dict())
        differing = sorted(k for k in own if k not in ("seed", "debug_nan_at_iteration") and
                           len({repr(s.get(k)) for s in settings}) > 1)
        label += (f" ({', '.join(f'{k}={own[k]}' for k in differing)})" if differing
                  else f" ({os.path.basename(os.path.normpath(run_dirs[0]))})")
    return label + f", {len(run_dirs)} seed{'s' if len(run_dirs) > 1 else ''}"


def expand_sweeps(run_dirs: list[str]) -> list[str]:
    """Run directories, with a sweep's directory (holding sweep.json) replaced by its
    members'."""
    from metarl_jax.sweep import SWEEP_INDEX, member_dirs

    expanded = []
    for path in run_dirs:
        if os.path.exists(os.path.join(path, SWEEP_INDEX)):
            expanded.extend(member_dirs(path))
        else:
            expanded.append(path)
    return expanded


def plot_runs(run_dirs: list[str], out: str, show_pre: bool = True,
              references: list[tuple[float, float, str]] = (), title: str | None = None,
              show_std: bool = False) -> str:
    """Post-update (solid) and pre-update (dashed) return against environment steps:
    the mean over the seeds of each configuration, shaded between min and max.

    `references`: (env_steps, return, label) points drawn as black markers, such as a
    paper's reported values. `show_std`: a panel below with the policy's σ (the
    `policy_std` metric, averaged over action dimensions) on the same steps."""
    plt = _pyplot()
    if show_std:
        fig, (ax, std_ax) = plt.subplots(2, 1, figsize=(7, 6), dpi=120, sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    groups = _group_runs(expand_sweeps(run_dirs))
    for color_index, group in enumerate(groups):
        color = f"C{color_index}"
        curves = [read_metrics(run_dir) for run_dir in group]
        length = min(len(c) for c in curves)
        if length == 0:
            continue
        steps = np.array([r["env_steps"] for r in curves[0][:length]], dtype=float)
        label = _label(group, groups)
        for key, style in (("post_return", "-"), ("pre_return", "--")):
            if key == "pre_return" and not show_pre:
                continue
            values = np.array([[r[key] for r in c[:length]] for c in curves])
            name = "post-update" if key == "post_return" else "pre-update"
            ax.plot(steps, values.mean(axis=0), style, color=color, label=f"{label}: {name}")
            if len(curves) > 1:
                ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=color,
                                alpha=0.2, linewidth=0)
        if show_std and all("policy_std" in r for c in curves for r in c[:length]):
            sigma = np.array([[r["policy_std"] for r in c[:length]] for c in curves])
            std_ax.plot(steps, sigma.mean(axis=0), color=color)
            if len(curves) > 1:
                std_ax.fill_between(steps, sigma.min(axis=0), sigma.max(axis=0), color=color,
                                    alpha=0.2, linewidth=0)
    for marker, (steps, value, label) in zip("*^sDv", references):
        ax.plot([steps], [value], marker, color="black", markersize=9, label=label)
    (std_ax if show_std else ax).set_xlabel("environment steps")
    ax.set_ylabel("mean episode return")
    if show_std:
        std_ax.set_ylabel("policy σ")
        std_ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    # Headroom for the legend above the curves, so that it hides none of them.
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.06 * len(ax.get_legend_handles_labels()[0]) * (high - low))
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_adaptation(result: dict, out: str) -> str:
    """Return against adaptation step, with standard-error bars, from `evaluate`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.errorbar(result["adapt_steps"], result["return_mean"], yerr=result["return_stderr"],
                marker="o", capsize=4)
    ax.set_xlabel("adaptation steps")
    ax.set_ylabel("mean episode return")
    ax.set_xticks(result["adapt_steps"])
    ax.set_title(f"{result['algo']} on {result['env']}, {result['tasks']} held-out tasks",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
