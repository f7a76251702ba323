"""The pictures of `compare analyze`: spectra per layer, norms by layer, and phi heat maps.

`write_plots(result, folder)` draws from the dict `compare.analyze` returns and writes PNGs into
`folder`: analyze's temporary folder, from which they are renamed into place, so no PNG is ever
seen half-written. Matplotlib's Agg canvas: no display needed.
"""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from .analyze import short_names
from .plots import new_figure

MAX_PHI_PANELS = 11  # per-layer heat maps after the mean one: a 3 x 4 grid stays readable
MAX_LEGEND = 16      # layers named in the spectra legend; more only get colours


def write_plots(result: dict, folder: Path) -> list[str]:
    """spectra.png, norms.png and, when the analysis compared two adapters, subspace_similarity.png."""
    made = [_spectra(result, folder / "spectra.png"), _norms(result, folder / "norms.png")]
    if result["against"] is not None and any(s.get("subspace_similarity") for s in result["layers"].values()):
        made.append(_phi(result, folder / "subspace_similarity.png"))
    return made


def _figure(width: float, height: float):
    return new_figure(width, height, layout="constrained")  # constrained: room for colour bars


def _save(fig, path: Path) -> str:
    fig.savefig(path, format="png", dpi=90)
    return path.name


def _label(source: str) -> str:
    """The last two components of an adapter path ('r4-seed0/adapter'): enough to tell runs apart."""
    return "/".join(Path(source).parts[-2:])


def _spectra(result: dict, path: Path) -> str:
    """Singular values of delta W against their index, one line per layer (log scale when all > 0)."""
    layers = result["layers"]
    names = short_names(list(layers))
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import colormaps

    colours = colormaps["viridis"]
    n = len(layers)
    all_positive = True
    for idx, (p, s) in enumerate(layers.items()):
        sv = s["singular_values"]
        all_positive &= all(v > 0 for v in sv)
        ax.plot(range(1, len(sv) + 1), sv, marker="o", markersize=3, linewidth=1,
                color=colours(idx / max(1, n - 1)), label=names[p] if n <= MAX_LEGEND else None)
    if all_positive:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index i")
    ax.set_ylabel("sigma_i of delta W = s*B@A")
    ax.set_title(f"spectra of {_label(result['adapter'])} ({n} layers)")
    if n <= MAX_LEGEND:
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def _norms(result: dict, path: Path) -> str:
    """||delta W||_F by layer, and with a base ||delta W|| / ||W|| and the amplification factor."""
    layers = result["layers"]
    names = list(short_names(list(layers)).values())
    panels = [("delta_fro", "||delta W||_F")]
    if result["base"] is not None:
        panels += [("delta_to_base", "||delta W||_F / ||W||_F"),
                   ("amplification", "||delta W||_F / ||U^T W V||_F (amplification)")]
    fig = _figure(max(7.0, 0.35 * len(layers) + 2), 2.6 * len(panels) + 1.2)
    xs = range(len(layers))
    for k, (key, label) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, k + 1)
        vals = [s.get(key) for s in layers.values()]
        ax.bar(xs, [v if isinstance(v, (int, float)) and math.isfinite(v) else 0 for v in vals], color="tab:blue")
        ax.set_ylabel(label, fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names if k == len(panels) - 1 else [], rotation=90, fontsize=6)
    return _save(fig, path)


def _phi(result: dict, path: Path) -> str:
    """Heat maps of phi(i, j) as in Hu et al. 2021, Figure 3: the mean over layers, then per layer."""
    layers = {p: s for p, s in result["layers"].items() if s.get("subspace_similarity")}
    names = short_names(list(result["layers"]))
    panels = []
    mean = result["summary"].get("mean_subspace_similarity")
    if mean is not None and len(layers) > 1:
        panels.append((f"mean over {result['summary']['mean_subspace_similarity_layers']} layers", mean))
    panels += [(names[p], s["subspace_similarity"]) for p, s in list(layers.items())[:MAX_PHI_PANELS]]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(3.2 * cols + 1.0, 2.9 * rows + 0.6)
    image = None
    for k, (title, phi) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        r1, r2 = len(phi), len(phi[0])
        # origin lower: i grows upwards, cell (i, j) centred on integer coordinates as in the paper
        image = ax.imshow(phi, origin="lower", vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                          extent=(0.5, r2 + 0.5, 0.5, r1 + 0.5), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(f"j (against, r={r2})", fontsize=7)
        ax.set_ylabel(f"i (adapter, r={r1})", fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=6)
    more = len(layers) - MAX_PHI_PANELS
    fig.suptitle(f"phi(i, j): {_label(result['adapter'])} (i) vs {_label(result['against'])} (j), "
                 f"{result['subspace_meaning'].split(' (')[0]}"
                 + (f"  ({more} more layers in analysis.json)" if more > 0 else ""), fontsize=9)
    fig.colorbar(image, ax=fig.axes, shrink=0.8)
    return _save(fig, path)
