"""The plots of a pipeline run as PNG bytes (engine-free; matplotlib, imported on first use, with
the Agg backend): records per category, counts per reason, token lengths, the loss curve, and
the evaluation's headline per category and paired differences with their intervals.

The run report embeds them; the train job logs the loss curve to MLflow. Labels come from the
data and are drawn literally (mathtext off).
"""
from __future__ import annotations

import functools
import io

from dollyflow.core.evaluation.headline import LABELS


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _literal_text(fn):
    """Draw with matplotlib's mathtext off (``text.parse_math``): labels come from the data (a
    category, a quarantine reason, a split), and one holding ``$`` (``$x$``, ``cost $5 or $``),
    ``_``, ``^`` or ``\\alpha`` is drawn as the characters it is, never parsed (a malformed
    formula would fail the whole report)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _plt().rc_context({"text.parse_math": False}):
            return fn(*args, **kwargs)

    return wrapper


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return buf.getvalue()


def _bars(ax, labels, series: dict[str, list], horizontal: bool = True):
    """Grouped bars with their values written at the bar ends."""
    n = max(1, len(series))
    height = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        pos = [k + (i - (n - 1) / 2) * height for k in range(len(labels))]
        bars = (ax.barh if horizontal else ax.bar)(pos, values, height, label=name)
        ax.bar_label(bars, labels=[f"{v:,}" if isinstance(v, int) else f"{v:.3g}" for v in values],
                     padding=2, fontsize=8)
    if horizontal:
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.margins(x=0.15)
    else:
        ax.set_xticks(range(len(labels)), labels)
        ax.margins(y=0.15)
    if n > 1:
        ax.legend(fontsize=8)


@_literal_text
def plot_categories(categories: dict[str, dict]) -> bytes:
    """Records per category in bronze (ingested) and silver (after dedupe)."""
    plt = _plt()
    labels = sorted(categories)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.4))
    _bars(ax, labels, {"bronze (ingested)": [categories[c].get("bronze", 0) for c in labels],
                       "silver (after dedupe)": [categories[c].get("silver", 0) for c in labels]})
    ax.set_xlabel("records")
    ax.set_title("Records per category")
    return _png(fig)


@_literal_text
def plot_counts(counts: dict[str, int], title: str, xlabel: str) -> bytes:
    """One horizontal bar per key (quarantine reasons, duplicate kinds, finish reasons)."""
    plt = _plt()
    labels = sorted(counts, key=lambda k: (-counts[k], k))
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(1, len(labels)) + 1.4))
    _bars(ax, labels, {"": [int(counts[k]) for k in labels]})
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


@_literal_text
def plot_lengths(tokens: dict) -> bytes:
    """Token length histogram per split (bins of the tokenized table), with max_length marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    max_length = tokens.get("max_length")
    splits = tokens.get("splits", {})
    # the biggest split first, the smaller ones drawn over it (outlined, so none hides another)
    for i, split in enumerate(sorted(splits, key=lambda s: -sum(splits[s]["bins"].values()))):
        s = splits[split]
        w = s["width"]
        bins = {int(k): v for k, v in s["bins"].items()}
        xs = [b * w for b in sorted(bins)]
        ax.bar(xs, [bins[b] for b in sorted(bins)], width=w, align="edge", alpha=0.55 if i == 0 else 0.9,
               label=f"{split} ({sum(bins.values()):,} records)", edgecolor="white" if i == 0 else "black",
               linewidth=0.5 if i == 0 else 1.0, zorder=2 + i)
    from matplotlib.ticker import MaxNLocator
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if max_length:
        drops = sum((tokens.get("drops") or {}).values())
        ax.axvline(max_length, color="crimson", linestyle="--",
                   label=f"max_length {max_length} ({drops:,} longer records dropped)")
    ax.set_xlabel("tokens per record (prompt + response + ### End)")
    ax.set_ylabel("records")
    ax.set_title("Token length per split")
    ax.legend(fontsize=8)
    return _png(fig)


@_literal_text
def plot_loss(metrics: list[dict]) -> bytes:
    """Train loss per step (and its running mean) and eval loss at each evaluation."""
    plt = _plt()
    train = [(m["step"], m["loss"]) for m in metrics if m.get("kind") == "train" and m.get("loss") is not None]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if m.get("kind") == "eval" and m.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    if train:
        ax.plot(*zip(*train), color="tab:blue", alpha=0.35, linewidth=1, label="train loss (per step)")
        k = max(1, len(train) // 20)
        if k > 1:   # a running mean once there are enough steps to make the raw curve noisy
            smooth = [(train[i][0], sum(v for _, v in train[max(0, i - k + 1):i + 1]) / len(train[max(0, i - k + 1):i + 1]))
                      for i in range(len(train))]
            ax.plot(*zip(*smooth), color="tab:blue", linewidth=2, label=f"train loss (mean of {k} steps)")
        else:
            ax.lines[-1].set(alpha=1.0, linewidth=1.5)
    if evals:
        ax.plot(*zip(*evals), color="tab:orange", marker="o", linewidth=2, label="eval loss (test split)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / response token)")
    ax.set_title("Training and evaluation loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend(fontsize=8)
    return _png(fig)


@_literal_text
def plot_category_loss(per_category: dict[str, dict]) -> bytes:
    """The final eval loss per category (records in the test split in the label)."""
    plt = _plt()
    labels = sorted(per_category)
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(1, len(labels)) + 1.4))
    _bars(ax, [f"{c} ({per_category[c].get('records', '?')})" for c in labels],
          {"": [float(per_category[c]["loss"]) for c in labels]})
    ax.set_xlabel("eval loss (nats / response token)")
    ax.set_title("Final eval loss per category (test records per category in brackets)")
    return _png(fig)


def _metric_label(metric: str) -> str:
    return "headline" if metric == "headline" else LABELS.get(metric, metric)


def _headline_rows(headline: dict) -> list[str]:
    """The headline table's categories in order, "overall" last."""
    return sorted(c for c in headline if c != "overall") + (["overall"] if "overall" in headline else [])


@_literal_text
def plot_headline(headline: dict, sides: list[str]) -> bytes:
    """Per category, each side's mean of the category's headline metric as a bar with its
    bootstrap interval as a whisker (the evaluate job's ``headline`` table); sides grouped."""
    plt = _plt()
    cats = _headline_rows(headline)
    def records(c: str) -> str:
        iv = (headline[c].get("sides") or {}).get(sides[0]) if sides else None
        return f" · n={iv['n']}" if iv and iv.get("n") is not None else ""

    labels = [f"{c or '(no category)'} · {_metric_label(headline[c].get('metric', ''))}{records(c)}" for c in cats]
    n = max(1, len(sides))
    fig, ax = plt.subplots(figsize=(8.5, 0.32 * n * len(cats) + 0.35 * len(cats) + 1.6))
    height = 0.8 / n
    for i, side in enumerate(sides):
        means, errs = [], [[], []]
        for c in cats:
            iv = (headline[c].get("sides") or {}).get(side) or {}
            m, lo, hi = iv.get("mean"), iv.get("low"), iv.get("high")
            means.append(float("nan") if m is None else m)
            errs[0].append(0.0 if m is None or lo is None else max(0.0, m - lo))
            errs[1].append(0.0 if m is None or hi is None else max(0.0, hi - m))
        pos = [k + (i - (n - 1) / 2) * height for k in range(len(cats))]
        ax.barh(pos, [0.0 if v != v else v for v in means], height, xerr=errs, capsize=3, label=side,
                error_kw={"elinewidth": 1, "ecolor": "#333"})
        for k, (p, v) in enumerate(zip(pos, means)):   # the value right of the whisker
            ax.text((0.0 if v != v else v + errs[1][k]) + 0.01, p, "n/a" if v != v else f"{v:.3f}", va="center",
                    fontsize=7)
    ax.set_yticks(range(len(cats)), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("mean of the category's headline metric (0-1), whiskers: bootstrap interval")
    ax.set_title("Answer quality per category")
    ax.grid(axis="x", alpha=0.3)
    if n > 1:
        ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


@_literal_text
def plot_differences(headline: dict, key: str) -> bytes:
    """Per category, the paired difference ``key`` (e.g. "B - A") of the headline metric with its
    bootstrap interval; intervals that exclude 0 are drawn solid, the others grey."""
    plt = _plt()
    cats = [c for c in _headline_rows(headline) if ((headline[c].get("diff") or {}).get(key) or {}).get("diff")
            is not None]
    fig, ax = plt.subplots(figsize=(8.5, 0.4 * max(1, len(cats)) + 1.6))
    for k, c in enumerate(cats):
        d = headline[c]["diff"][key]
        color = ("tab:green" if d["diff"] > 0 else "tab:red") if d.get("significant") else "0.55"
        lo, hi = d.get("low"), d.get("high")
        if lo is not None and hi is not None:
            ax.plot([lo, hi], [k, k], color=color, linewidth=2.5, solid_capstyle="butt")
        ax.plot([d["diff"]], [k], "o", color=color, markersize=6)
        ax.annotate(f"{d['diff']:+.3f}", (d["diff"], k), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=7)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(cats)), [f"{c or '(no category)'} · {_metric_label(headline[c].get('metric', ''))}"
                                     for c in cats])
    ax.set_ylim(len(cats) - 0.5, -0.7)
    ax.set_xlabel(f"{key} (paired bootstrap interval; coloured: excludes 0)")
    ax.set_title(f"Difference per category: {key}")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)
