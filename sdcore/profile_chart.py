"""hotspots.png for ``sdcore profile``: one panel per component (and one for the whole image), one horizontal
bar per backend, stacked by family in fixed colors. Each panel has its own ms axis, because the UNet is
thousands of times the scheduler step and a shared axis would hide everything but the UNet."""
from __future__ import annotations

from pathlib import Path

from .profile import COMPONENTS, FAMILIES, OVERHEAD

COLORS = {"attention": "#d62728", "group_norm": "#2ca02c", "layer_norm": "#98df8a", "conv": "#1f77b4",
          "linear/matmul": "#ff7f0e", "elementwise": "#9467bd", "copy/layout": "#8c564b",
          "scheduler": "#e377c2", "other": "#c7c7c7", OVERHEAD: "#525252"}


def _panels(summary: dict):
    """(title, {backend: {segment: ms}}) per panel: the whole image first, then each component."""
    res = summary["backends"]
    whole = {}
    for b, r in res.items():
        segments = {f: sum(c["families"].get(f, 0.0) for c in r["components"].values()) for f in FAMILIES}
        segments[OVERHEAD] = max(r["overhead"]["ms_per_image"], 0.0)
        whole[b] = segments
    yield "whole image (components + pipeline overhead)", whole
    for c in COMPONENTS:
        calls = next(iter(res.values()))["components"][c]["calls"]
        yield f"{c} ({calls} call{'s' * (calls != 1)})", {b: r["components"][c]["families"] for b, r in res.items()}


def _speedups(bars: dict) -> str:
    """'torch/kernels 1.23x' for each backend after the first, from the bar totals."""
    totals = {b: sum(seg.values()) for b, seg in bars.items()}
    base, *others = totals
    return "   ".join(f"{b}/{base} {totals[b] / totals[base]:.2f}x" for b in others if totals[base] > 0)


def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def render(summary: dict, path: str | Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("hotspots.png needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display, and no GUI toolkit needed
    import matplotlib.pyplot as plt

    s, backends = summary["settings"], list(summary["backends"])
    panels = list(_panels(summary))
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 1.0 + 0.55 * len(backends) * len(panels) + 0.6 * len(panels)))
    used = set()
    for ax, (title, bars) in zip(axes, panels):
        top = max(sum(seg.values()) for seg in bars.values()) or 1.0
        for y, b in enumerate(backends):
            left = 0.0
            for name in (*FAMILIES, OVERHEAD):
                ms = bars[b].get(name, 0.0)
                if ms <= 0:
                    continue
                used.add(name)
                ax.barh(y, ms, left=left, color=COLORS[name], edgecolor="white", linewidth=0.5, height=0.7)
                if ms / top > 0.07:  # label segments wide enough to hold their number
                    ax.text(left + ms / 2, y, _ms(ms), ha="center", va="center", fontsize=8,
                            color="white" if name in ("conv", OVERHEAD, "attention", "copy/layout") else "black")
                left += ms
            ax.text(left + top * 0.01, y, f"{_ms(left)} ms", va="center", fontsize=9, fontweight="bold")
        ax.set_yticks(range(len(backends)), backends)
        ax.invert_yaxis()
        ax.set_xlim(0, top * 1.15)
        ax.set_title(title, loc="left", fontsize=10, fontweight="bold")
        ax.set_title(_speedups(bars), loc="right", fontsize=9)
        ax.set_xlabel("ms per image", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    what = "self CPU time" if s["device"] == "cpu" else "GPU kernel time"
    fig.suptitle(f"sdcore profile: {s['model']}, {s['size']}, {s['steps']} steps, batch {s['batch']}, {s['dtype']} "
                 f"on {s['device_name']}\n{what} per component, by op family", fontsize=11)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[n]) for n in (*FAMILIES, OVERHEAD) if n in used]
    fig.legend(handles, [n for n in (*FAMILIES, OVERHEAD) if n in used], loc="lower center",
               ncol=min(len(handles), 6), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
