"""Reporting: the results table and the sweep figure of `python -m tiny_gpt`, from its rows (dicts)."""

import os
import statistics

# One colour per method in every figure of the project (the notebook and the study use it too).
METHOD_COLORS = {"base": "tab:gray", "fft": "black", "lora": "tab:blue", "gralora": "tab:orange",
                 "hybrid": "tab:green"}


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value) of any iterable of numbers."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows):
    """Group rows by configuration (method, r, k, hybrid_r, and lr and outlier_scale where rows have them)
    across seeds, in first-seen order.

    Returns one dict per configuration with its first row's fields and, for val_loss, pass_at_1 and
    seconds, a (mean, std) pair; n is the number of seeds.
    """
    groups = {}
    for row in rows:
        key = (row["method"], row["r"], row["k"], row["hybrid_r"], row.get("lr"), row.get("outlier_scale", 1.0))
        groups.setdefault(key, []).append(row)
    summary = []
    for group in groups.values():
        entry = {key: group[0][key] for key in ("method", "r", "k", "hybrid_r", "rank_budget",
                                                "trainable_params", "adapter_flops_per_token")}
        for key in ("val_loss", "pass_at_1", "seconds"):
            entry[key] = mean_std([row[key] for row in group])
        entry["n"] = len(group)
        summary.append(entry)
    return summary


def format_table(rows):
    """The results as a fixed-width text table; with several seeds, cells read mean ± std."""
    several = any(entry["n"] > 1 for entry in summarize(rows))

    def cell(pair, digits, scale=1.0):
        mean, std = pair
        return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}" if several else f"{scale * mean:.{digits}f}"

    def dash(value):
        return "-" if value is None else str(value)

    header = ["method", "r", "k", "hybrid_r", "trainable", "adapter FLOPs/tok", "val loss", "pass@1 %",
              "seconds", "seeds"]
    lines = [[e["method"], dash(e["r"]), dash(e["k"]), dash(e["hybrid_r"]), f"{e['trainable_params']:,}",
              f"{e['adapter_flops_per_token']:,}", cell(e["val_loss"], 4), cell(e["pass_at_1"], 1, 100),
              cell(e["seconds"], 1), str(e["n"])] for e in summarize(rows)]
    widths = [max(len(str(line[i])) for line in [header] + lines) for i in range(len(header))]
    fmt = lambda line: "  ".join(str(c).rjust(w) for c, w in zip(line, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def plot_sweep(rows, path=None):
    """Val loss and pass@1 (in percent) against the rank budget, one line per adapter method (and k), mean ±
    std over seeds; FFT and the base model as horizontal references. Each method has its colour from
    METHOD_COLORS. The val-loss axis is logarithmic, so that one diverged run does not flatten the others.
    Saved to `path` if given; returns the figure."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")  # no display needed to write a file
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    summary = summarize(rows)
    # One line per method; GraLoRA's k is written next to its points. Only a sweep over k (several k at
    # one rank budget) gets one line per (method, k), in the method's colour, told apart by line style.
    ks_at = {}
    for e in summary:
        ks_at.setdefault((e["method"], e["rank_budget"]), set()).add(e["k"])
    sweep_k = any(len(ks) > 1 for ks in ks_at.values())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label, scale in ((axes[0], "val_loss", "val loss (completion tokens, log scale)", 1.0),
                                  (axes[1], "pass_at_1", "pass@1 on held-out tasks (%)", 100.0)):
        lines = {}
        for e in summary:
            if e["rank_budget"] is not None:
                name = f"{e['method']} k={e['k']}" if sweep_k and e["method"] != "lora" else e["method"]
                lines.setdefault(name, []).append(e)
        shown, styles = [], ["-", "--", ":", "-."]
        for name, entries in lines.items():
            entries.sort(key=lambda e: e["rank_budget"])
            method = entries[0]["method"]
            same_method = [n for n in lines if lines[n][0]["method"] == method]
            xs = [e["rank_budget"] for e in entries]
            ys = [scale * e[key][0] for e in entries]
            ax.errorbar(xs, ys, yerr=[scale * e[key][1] for e in entries], marker="o", capsize=3, label=name,
                        color=METHOD_COLORS[method], linestyle=styles[same_method.index(name) % len(styles)])
            shown += ys
            if not sweep_k and name == "gralora":
                for x, y, e in zip(xs, ys, entries):
                    ax.annotate(f"k={e['k']}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        low, high = (min(shown), max(shown)) if shown else (0.0, 1.0)
        for e in summary:
            if e["rank_budget"] is None:  # fft and base: no rank, a horizontal line
                mean, std = scale * e[key][0], scale * e[key][1]
                color = METHOD_COLORS[e["method"]]
                if key == "val_loss" and shown and not low / 2 <= mean <= 2 * high:
                    # far off the adapters' range (the base model's loss): say it instead of squashing the axis
                    ax.plot([], [], color=color, linestyle=":", label=f"{e['method']}: {mean:.3f}, off the axis")
                    continue
                ax.axhline(mean, label=e["method"], color=color, linestyle="--" if e["method"] == "fft" else ":")
                if std > 0:
                    ax.axhspan(mean - std, mean + std, color=color, alpha=0.1)
        if key == "val_loss":
            ax.set_yscale("log")
            # plain numbers on the log axis, and the minor ticks labelled too when it spans less than a decade
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.3g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(
                lambda y, _, ax=ax: f"{y:.3g}" if ax.get_ylim()[1] < 10 * ax.get_ylim()[0] else ""))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank budget (the LoRA rank with the same trainable parameters)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    n_seeds = max(e["n"] for e in summary)
    fig.suptitle(f"LoRA vs GraLoRA on toy HumanEval (mean ± std over {n_seeds} seed(s))")
    fig.tight_layout()
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
