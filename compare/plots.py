"""PNG pictures of compare's results: `compare speed --plot` and the sweep's results.png.

    plot_speed(result, "speed.png")      # result = run_speed(...): time per phase, ratio, memory
    plot_sweep(groups, keys, "out.png")  # groups = sweep_stats.summarise(rows, ...): mean +- std per setting

Both draw with `bars` (grouped bars, optional p10-p90 whiskers, a label over each bar) and write
through `save_png` (a temp name in the same folder, then a rename: an earlier picture is replaced
whole or not at all). Matplotlib's Agg canvas is used directly, so no display is needed and
pyplot's global state is never touched.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

NAN = float("nan")


def new_figure(width: float, height: float, **kwargs):
    """A matplotlib Figure on its own Agg canvas (no pyplot state, no display); kwargs go to Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _figure(panels: int, width: float, height: float = 4.5):
    fig = new_figure(width, height)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def check_png_path(path: Union[str, os.PathLike]) -> None:
    """Raise CompareError unless a PNG can be written at `path` (checked before any work runs)."""
    from .models import CompareError
    from .report import check_writable_file

    p = Path(path)
    if p.suffix.lower() != ".png":
        raise CompareError(f"--plot {path}: the picture is a PNG; give a path ending in .png")
    check_writable_file(p, "--plot")
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise CompareError(f"--plot needs matplotlib ({e}); pip install matplotlib") from None


def save_png(fig, path: Union[str, os.PathLike]) -> Path:
    """Write `fig` as a PNG to `path` atomically (temp file beside it, then rename), mode 0644."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=100)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def bars(ax, groups: Sequence[str], series: Mapping[str, Sequence[float]], *, title: str, ylabel: str,
         spread: Optional[Mapping[str, tuple[Sequence[float], Sequence[float]]]] = None,
         labels: Optional[Mapping[str, Sequence[str]]] = None, legend: Optional[bool] = None) -> None:
    """Grouped bars: one group per entry of `groups`, one bar per series within it.

    series: {name: one value per group} (NaN = no bar); spread: {name: (lows, highs)} drawn as
    whiskers from low to high; labels: {name: one text per group} written over the bars (default:
    the value in 3 significant digits). legend: default only for more than one series.
    """
    n = max(len(series), 1)
    width = 0.8 / n
    for j, (name, vals) in enumerate(series.items()):
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(groups))]
        heights = [0.0 if v is None or math.isnan(v) else v for v in vals]
        yerr = None
        if spread and name in spread:
            lo, hi = spread[name]
            yerr = [[max(h - low, 0.0) for h, low in zip(heights, lo)],
                    [max(high - h, 0.0) for h, high in zip(heights, hi)]]
        ax.bar(xs, heights, width, yerr=yerr, capsize=3, label=name)
        texts = labels[name] if labels and name in labels else [
            "" if v is None or math.isnan(v) else f"{v:.3g}" for v in vals]
        tops = heights if yerr is None else [h + e for h, e in zip(heights, yerr[1])]
        for x, top, text in zip(xs, tops, texts):
            ax.annotate(text, (x, top), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(range(len(groups))))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    if len(series) > 1 if legend is None else legend:
        ax.legend(fontsize=8)


def plot_speed(result: Mapping, path: Union[str, os.PathLike]) -> Path:
    """Three panels from a `run_speed` result: median time per phase with p10-p90 whiskers, each
    of our variants' ratio to peft per phase, and the memory at the step's peak by kind."""
    from .memory import CATEGORIES
    from .speed import PHASES

    ran = [v for v in result["variants"] if not v["skipped"]]
    fig, (t_ax, r_ax, m_ax) = _figure(3, 17)
    ms = lambda v, key: [v[p][key] * 1e3 for p in PHASES]  # noqa: E731
    bars(t_ax, PHASES, {v["name"]: ms(v, "median_s") for v in ran},
         spread={v["name"]: (ms(v, "p10_s"), ms(v, "p90_s")) for v in ran},
         title="median time per phase (whiskers: p10-p90)", ylabel="ms")
    ours = [v for v in ran if v["name"] != "peft"]
    bars(r_ax, PHASES, {v["name"]: [v[p]["ratio_to_peft"] for p in PHASES] for v in ours},
         labels={v["name"]: [f"{v[p]['ratio_to_peft']:.3g} (cpu {v[p]['cpu_ratio_to_peft']:.3g})"
                             for p in PHASES] for v in ours},
         title="ours / peft, median wall time (below 1: ours faster)", ylabel="ratio", legend=True)
    r_ax.axhline(1.0, color="black", linewidth=0.8)

    names = [v["name"] for v in ran]
    bottom = [0.0] * len(ran)
    for cat in CATEGORIES:
        mib = [v["memory"]["breakdown_bytes"][cat] / 2**20 for v in ran]
        m_ax.bar(names, mib, 0.6, bottom=bottom, label=cat)
        bottom = [b + x for b, x in zip(bottom, mib)]
    for i, v in enumerate(ran):
        mem = v["memory"]
        layers = mem["saved_per_layer_bytes"]
        per_layer = sum(layers.values()) / len(layers) if layers else NAN
        m_ax.annotate(f"peak in {mem['peak_phase']}, {_size(mem['step_bytes'])} above start\n"
                      f"saved per LoRA layer {_size(per_layer)}", (i, bottom[i]), ha="center",
                      va="bottom", fontsize=7)
    m_ax.set_title("live tensor bytes at the step's peak, by kind", fontsize=10)
    m_ax.set_ylabel("MiB")
    m_ax.margins(y=0.2)
    m_ax.legend(fontsize=7)
    s = result["spec"]
    fig.suptitle(f"compare speed: {Path(s['model']).name} {s['quantization']} {s['dtype']} r={s['r']} "
                 f"batch {s['batch']}x{s['seq']} lora_dropout={result['lora_dropout']}; {result['device']}",
                 fontsize=9)
    return save_png(fig, path)


def _size(n: float) -> str:
    """Bytes in KiB or MiB, 3 significant digits."""
    return "n/a" if math.isnan(n) else f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{n / 2**10:.3g} KiB"


def plot_sweep(groups: Sequence[Mapping], keys: Sequence[str], path: Union[str, os.PathLike]) -> Path:
    """Panels from a sweep's summary groups (sweep_stats.summarise): final eval loss, and mean step
    time with each setting's ratio to the first one that finished, each as the mean over the
    setting's runs with +-1 sample std whiskers and n; a third panel, phi diag against the
    reference run, when the sweep analysed its runs ("failed" over a setting with no finished run)."""
    # groups may come from several sweeps merged into one results.json (keys missing in some) and
    # from JSON (a metric written as null or "nan")
    labels = ["\n".join(f"{k}={g[k]}" for k in keys if k in g) or "base config" for g in groups]
    panels = [("eval_loss", 1.0, "final eval loss (mean, +-1 std)", "loss"),
              ("step_time_s", 1e3, "mean step time (ratio to the first finished setting)", "ms")]
    if any(not math.isnan(_as_float(g.get("phi_diag_mean"))) for g in groups):
        panels.append(("phi_diag", 1.0, "phi(i, i) against the reference, mean over i <= min(r1, r2)", "phi"))
    fig, axes = _figure(len(panels), max(6.0, 1.6 * len(groups)) * len(panels))
    for ax, (metric, scale, title, ylabel) in zip(axes, panels):
        mean = [_as_float(g.get(f"{metric}_mean")) * scale for g in groups]
        std = [_as_float(g.get(f"{metric}_std")) * scale for g in groups]
        std = [0.0 if math.isnan(s) or math.isnan(m) else s for m, s in zip(mean, std)]
        ends = [0.0 if math.isnan(m) else m for m in mean]  # a missing bar gets no whisker
        first = next((m for m in mean if not math.isnan(m)), NAN)

        def text(g, m, s):
            if math.isnan(m):
                return "failed" if g.get("runs", 0) and g.get("failed") == g.get("runs") else ""
            ratio = f" ({m / first:.2f}x)" if metric == "step_time_s" and first > 0 else ""
            spread = f" +-{s:.2g}" if g.get(f"{metric}_n", 0) >= 2 else ""
            return f"{m:.3g}{spread}{ratio}\nn={g.get(f'{metric}_n', 0)}"

        bars(ax, labels, {metric: mean}, spread={metric: ([m - s for m, s in zip(ends, std)],
                                                           [m + s for m, s in zip(ends, std)])},
             labels={metric: [text(g, m, s) for g, m, s in zip(groups, mean, std)]}, title=title, ylabel=ylabel)
    return save_png(fig, path)


def _as_float(v) -> float:
    """A metric as a float; NaN for None or a value that is not a number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return NAN
