"""Plots of benchmark results (matplotlib, Agg backend): speed vs agreement as the exit threshold
varies, exit-layer histograms, the speed/quality frontier of the exit modes. :mod:`bench.plots` (the
script) describes the first two; :func:`plot_frontier` is :mod:`bench.spec`'s."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _save(fig, ax, path) -> Path:
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_speed_vs_agreement(rows: list[dict], path, agreement_key: str = "agreement",
                            title: Optional[str] = None) -> Path:
    """Speed-up over the full model (y) vs agreement with it (x), one line per (variant, batch).

    Rows without ``speedup_vs_full`` or ``agreement_key`` are skipped. Returns the PNG's path.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("speedup_vs_full") is None or r.get(agreement_key) is None:
            continue
        groups.setdefault((r.get("variant", "?"), r.get("batch")), []).append(r)
    if not groups:
        raise ValueError(f"no rows with 'speedup_vs_full' and {agreement_key!r}")
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for (variant, batch), rs in groups.items():
        label = variant if batch is None else f"{variant}, batch {batch}"
        numeric = sorted((r for r in rs if _is_number(r.get("threshold"))), key=lambda r: r["threshold"])
        other = [r for r in rs if not _is_number(r.get("threshold"))]
        color = None
        if numeric:
            (line,) = ax.plot([r[agreement_key] for r in numeric], [r["speedup_vs_full"] for r in numeric],
                              marker="o", label=label)
            color = line.get_color()
        for r in other:
            pts = ax.scatter([r[agreement_key]], [r["speedup_vs_full"]], marker="*", s=140, color=color,
                             zorder=3, label=None if numeric else label)
            color = color or pts.get_facecolor()[0]
        for r in numeric + other:
            t = r.get("threshold")
            ax.annotate(f"{t:g}" if _is_number(t) else str(t), (r[agreement_key], r["speedup_vs_full"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.scatter([1.0], [1.0], marker="s", color="black", zorder=3, label="full model")
    ax.set_xlabel(f"{agreement_key} with the full model (share of equal greedy tokens)")
    ax.set_ylabel("speed-up over the full model (output tokens/s ratio)")
    ax.set_title(title or "Speed vs agreement as the exit threshold varies (labels: threshold)")
    ax.grid(alpha=0.3)
    return _save(fig, ax, path)


def plot_exit_histogram(counts_by_variant: dict[str, dict], num_layers: Optional[int], path,
                        title: Optional[str] = None) -> Path:
    """Grouped bars: per variant, the fraction of tokens exiting at each layer. Returns the PNG's path.

    ``counts_by_variant``: ``{variant: {layer: count}}`` (layer keys may be strings, as in JSON).
    """
    counts = {v: {int(k): int(n) for k, n in c.items()} for v, c in counts_by_variant.items()
              if c and sum(c.values())}
    if not counts:
        raise ValueError("no exit-layer counts")
    layers = sorted({l for c in counts.values() for l in c} | ({num_layers} if num_layers else set()))
    width = 0.8 / len(counts)
    fig, ax = plt.subplots(figsize=(min(16, max(7, 0.25 * len(layers) * len(counts))), 4.5))
    for i, (variant, c) in enumerate(counts.items()):
        total = sum(c.values())
        mean = sum(l * n for l, n in c.items()) / total
        xs = [j + (i - (len(counts) - 1) / 2) * width for j in range(len(layers))]
        ax.bar(xs, [c.get(l, 0) / total for l in layers], width=width,
               label=f"{variant} (mean {mean:.1f}, {total} tokens)")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([f"{l}\n(full)" if l == num_layers else str(l) for l in layers])
    ax.set_xlabel("exit layer" + (f" (of {num_layers})" if num_layers else ""))
    ax.set_ylabel("fraction of generated tokens")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or "Exit-layer distribution")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, ax, path)


def exit_counts_from_results(data: dict) -> tuple[dict[str, dict], Optional[int]]:
    """``({variant: {layer: count}}, num_layers)`` from a saved benchmark JSON (see the module doc)."""
    num_layers = data.get("num_layers")
    if isinstance(data.get("exit_layer_counts"), dict):
        return dict(data["exit_layer_counts"]), num_layers
    out: dict[str, dict] = {}
    for r in data.get("rows", []):
        if not r.get("exit_layer_counts"):
            continue
        tag = r.get("rate", r.get("batch"))
        label = r.get("variant", "?") + (f"@{tag}" if tag is not None else "")
        acc = out.setdefault(label, {})
        for k, n in r["exit_layer_counts"].items():
            acc[str(k)] = acc.get(str(k), 0) + int(n)
        num_layers = num_layers or r.get("num_layers")
    return out, num_layers


def plot_frontier(rows: list[dict], path) -> None:
    """Speed-up over the full model (y) against free-running ROUGE-L against the full model's answers
    (x), one marker per variant, one colour per batch size: the speed/quality frontier of every mode."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"full": "s", "lossy": "o", "verified": "*", "self_spec": "P", "layer_skip": "X"}
    for b, color in zip(sorted({r["batch"] for r in rows}), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        pts = [r for r in rows if r["batch"] == b]
        for r in pts:
            kind = r["variant"].split("@")[0]
            ax.scatter(r["rouge_l"], r["speedup_vs_full"], color=color, marker=markers.get(kind, "o"), s=60,
                       label=f"batch {b}" if r is pts[0] else None)
            ax.annotate(r["variant"], (r["rouge_l"], r["speedup_vs_full"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("free-running ROUGE-L vs the full model's answer (1 = same text)")
    ax.set_ylabel("tokens/s vs the full model")
    ax.set_title("early-exit modes: speed vs quality (lossless modes sit at ROUGE-L 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
