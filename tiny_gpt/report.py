"""Reporting: the results table and the sweep figure of `python -m tiny_gpt`, from its rows (dicts)."""

import math
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
    across seeds, in first-seen order: one dict each with its first row's fields, n (seeds), diverged (how
    many did), and (mean, std) of seconds over all seeds, of val_loss and pass_at_1 over those that did not
    diverge (None when all did)."""
    groups = {}
    for row in rows:
        key = (row["method"], row["r"], row["k"], row["hybrid_r"], row.get("lr"), row.get("outlier_scale", 1.0))
        groups.setdefault(key, []).append(row)
    summary = []
    for group in groups.values():
        entry = {key: group[0][key] for key in ("method", "r", "k", "hybrid_r", "rank_budget",
                                                "trainable_params", "adapter_flops_per_token")}
        finished = [row for row in group if not row.get("diverged")]
        for key in ("val_loss", "pass_at_1"):
            entry[key] = mean_std(row[key] for row in finished) if finished else None
        entry.update(seconds=mean_std(row["seconds"] for row in group), n=len(group),
                     diverged=len(group) - len(finished))
        summary.append(entry)
    return summary


def format_table(rows):
    """The results as a fixed-width text table; with several seeds, cells read mean ± std. Diverged runs are counted
    in the seeds column and left out of the means; a configuration whose every seed diverged reads "diverged"."""
    summary = summarize(rows)
    several = any(entry["n"] > 1 for entry in summary)

    def cell(pair, digits, scale=1.0):
        if pair is None:
            return "diverged"
        mean, std = pair
        return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}" if several else f"{scale * mean:.{digits}f}"

    dash = lambda value: "-" if value is None else str(value)  # noqa: E731
    header = ["method", "r", "k", "hybrid_r", "trainable", "adapter FLOPs/tok", "val loss", "pass@1 %",
              "seconds", "seeds"]
    lines = [[e["method"], dash(e["r"]), dash(e["k"]), dash(e["hybrid_r"]), f"{e['trainable_params']:,}",
              f"{e['adapter_flops_per_token']:,}", cell(e["val_loss"], 4), cell(e["pass_at_1"], 1, 100),
              cell(e["seconds"], 1), f"{e['n']}" + (f" ({e['diverged']} diverged)" if e["diverged"] else "")]
             for e in summary]
    widths = [max(len(str(line[i])) for line in [header] + lines) for i in range(len(header))]
    fmt = lambda line: "  ".join(str(c).rjust(w) for c, w in zip(line, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def _adapter_lines(ax, adapters, key, scale):
    """One line per adapter method against the rank budget (per method and k when the rows sweep k), mean ±
    std over seeds, in the method's colour. Returns the y values drawn."""
    ks = {(e["method"], e["rank_budget"], e["k"]) for e in adapters}
    sweep_k = len(ks) > len({key[:2] for key in ks})  # some method has several k at one rank
    lines, top, shown = {}, max(e["rank_budget"] for e in adapters), []
    for e in adapters:
        name = f"{e['method']} k={e['k']}" if sweep_k and e["method"] != "lora" else e["method"]
        lines.setdefault(name, []).append(e)
    for i, (name, entries) in enumerate(lines.items()):
        method, diverged = entries[0]["method"], [str(e["rank_budget"]) for e in entries if e[key] is None]
        entries = sorted((e for e in entries if e[key] is not None), key=lambda e: e["rank_budget"])
        xs, ys = [e["rank_budget"] for e in entries], [scale * e[key][0] for e in entries]
        name += f" (diverged at rank {', '.join(diverged)})" if diverged else ""
        if method == "hybrid" and max(xs, default=top) < top:
            name += f" (ranks ≤ {max(xs)} only, as in the paper)"
        ax.errorbar(xs, ys, yerr=[scale * e[key][1] for e in entries], marker="o", capsize=3, label=name,
                    color=METHOD_COLORS[method], linestyle="-" if not sweep_k else ["-", "--", ":", "-."][i % 4])
        if method == "gralora" and not sweep_k:
            for x, y, e in zip(xs, ys, entries):
                ax.annotate(f"k={e['k']}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        shown += ys
    return shown


def _reference_lines(ax, references, key, scale, low, high):
    """FFT and the base model (no rank) as horizontal lines, with a band of ± std over seeds; a val loss far
    outside the adapters' range [low, high] is written in the legend instead of stretching the axis."""
    for e in [e for e in references if e[key] is not None]:  # a reference whose every seed diverged draws nothing
        (mean, std), color = (scale * v for v in e[key]), METHOD_COLORS[e["method"]]
        if key == "val_loss" and not low / 2 <= mean <= 2 * high:
            ax.plot([], [], color=color, linestyle=":", label=f"{e['method']}: {mean:.3f}, off the axis")
            continue
        ax.axhline(mean, label=e["method"], color=color, linestyle="--" if e["method"] == "fft" else ":")
        if std > 0:
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.1, label=f"{e['method']} ± std over seeds")


def plot_sweep(rows, path=None):
    """Val loss and pass@1 (%) against the rank budget: a line per adapter method (see _adapter_lines), FFT and
    the base model as horizontal references, in METHOD_COLORS. The val-loss axis turns logarithmic when the
    adapters' losses span more than a factor of 3 (a stalled run). Saved to `path` if given; returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    summary = summarize(rows)
    adapters = [e for e in summary if e["rank_budget"] is not None]
    ranks = sorted({e["rank_budget"] for e in adapters})
    fig = (plt.figure if path is None else Figure)(figsize=(11, 4.4))  # to a file: pyplot and its backend untouched
    axes = fig.subplots(1, 2)
    for ax, key, label, scale in ((axes[0], "val_loss", "val loss (completion tokens)", 1.0),
                                  (axes[1], "pass_at_1", "pass@1 on held-out tasks (%)", 100.0)):
        shown = _adapter_lines(ax, adapters, key, scale) if adapters else []
        low, high = (min(shown), max(shown)) if shown else (0.0, math.inf)
        _reference_lines(ax, [e for e in summary if e["rank_budget"] is None], key, scale, low, high)
        if key == "val_loss" and shown and high > 3 * low:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            label += ", log scale"
        if ranks:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ranks, [str(r) for r in ranks])
            ax.set_xlim(ranks[0] / 1.5, ranks[-1] * 1.5)
            ax.minorticks_off()
        ax.set(xlabel="rank budget (the LoRA rank with the same trainable parameters)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"LoRA vs GraLoRA on toy HumanEval (mean ± std over {max(e['n'] for e in summary)} seed(s))")
    fig.tight_layout()
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
