"""A 2x2 sweep through train.run writes results.csv, results.json and results.png."""
import csv
import json
import math

import compare
from compare.__main__ import main

# Small runs: 2 optimizer steps on short sequences, a 24-example eval split, no checkpoints.
BASE = {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 48, "eval_split_size": 0.02,
        "per_device_eval_batch_size": 24}


def test_sweep_2x2_python_api(tmp_path):
    out = tmp_path / "sweep"
    rows = compare.sweep(BASE, {"r": [4, 8], "learning_rate": [1e-3, 3e-3]}, out_dir=out)
    assert [(r["r"], r["learning_rate"]) for r in rows] == [(4, 1e-3), (4, 3e-3), (8, 1e-3), (8, 3e-3)]
    for r in rows:
        assert r["error"] == "", r
        assert math.isfinite(r["eval_loss"]) and math.isfinite(r["eval_loss_before"])
        assert r["step_time_s"] > 0
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and {"r", "learning_rate", "eval_loss", "step_time_s"} <= set(table[0])
    data = json.loads((out / "results.json").read_text())
    assert data["grid_keys"] == ["r", "learning_rate"] and len(data["rows"]) == 4
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not list(out.glob(".*tmp*"))  # no temp files left behind


def test_sweep_cli_one_run(tmp_path, capsys):
    out = tmp_path / "cli"
    sets = [a for k, v in BASE.items() if k != "max_steps" for a in ("--set", f"{k}={v}")]
    assert main(["sweep", "--grid", "lora_alpha=8", *sets, "--max-steps", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lora_alpha" in printed and "eval loss" in printed
    assert {p.name for p in out.iterdir()} >= {"results.csv", "results.json", "results.png"}
