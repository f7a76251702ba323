"""compare.plots: the sweep's picture from its summary; a PNG replaces an earlier file whole or not at all."""
import pytest

from compare import plots
from compare.sweep_stats import summarise

PNG = b"\x89PNG\r\n\x1a\n"
ROWS = [{"r": 4, "seed": 0, "eval_loss": 2.5, "step_time_s": 0.010, "error": ""},
        {"r": 4, "seed": 1, "eval_loss": 2.7, "step_time_s": 0.012, "error": ""},
        {"r": 8, "seed": 0, "eval_loss": 2.4, "step_time_s": 0.015, "error": ""},
        {"r": 16, "seed": 0, "eval_loss": None, "step_time_s": None, "error": "RuntimeError: boom"}]


@pytest.mark.parametrize("analysed", [False, True])
def test_sweep_picture_with_error_bars_ratio_and_a_failed_setting(tmp_path, analysed):
    rows = [{**r, "phi_diag": 0.3} for r in ROWS] if analysed else ROWS
    groups, keys = summarise(rows, ["r", "seed"])
    assert keys == ["r"] and [g["runs"] for g in groups] == [2, 1, 1]
    path = tmp_path / "results.png"
    path.write_bytes(b"an earlier picture")
    assert plots.plot_sweep(groups, keys, path) == path
    assert path.read_bytes()[:8] == PNG
    assert [p.name for p in tmp_path.iterdir()] == ["results.png"]


def test_labels_drawn_over_the_bars():
    fig, (ax,) = plots._figure(1, 6)
    plots.bars(ax, ["r=4", "r=8"], {"step": [10.0, 15.0]}, title="t", ylabel="ms",
               spread={"step": ([9.0, 14.0], [12.0, 16.0])}, labels={"step": ["10 (1.00x)", "15 (1.50x)"]})
    assert [t.get_text() for t in ax.texts] == ["10 (1.00x)", "15 (1.50x)"]
    # The labels sit on the p90 whisker, not inside it.
    assert [t.xy[1] for t in ax.texts] == [12.0, 16.0]


def test_failed_write_keeps_the_earlier_file(tmp_path, monkeypatch):
    path = tmp_path / "results.png"
    path.write_bytes(b"an earlier picture")
    fig, _ = plots._figure(1, 4)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plots.save_png(fig, path)
    assert path.read_bytes() == b"an earlier picture"
    assert [p.name for p in tmp_path.iterdir()] == ["results.png"]
