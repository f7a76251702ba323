"""`compare sweep --jobs N`: runs in worker processes give the rows of a sequential sweep; Ctrl-C
stops every worker and keeps the finished rows, and a rerun runs only what is missing."""
import json
import multiprocessing
from pathlib import Path

import pytest

import compare
from compare.ablation import SweepInterrupted
from compare.sweep_jobs import CONSOLE

# Tiny real runs (see test_compare_sweep_seeds.py); the workers train for real, in fresh processes.
BASE = {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 48, "eval_split_size": 0.02,
        "per_device_eval_batch_size": 24}
TIMING = ("step_time_s", "tokens_per_s", "seconds", "output_dir")


def _same_run(r):
    """A row without what differs between two runs of the same setting, with its folder's name."""
    return {**{k: v for k, v in r.items() if k not in TIMING}, "folder": Path(r["output_dir"]).name}


@pytest.mark.slow
def test_two_jobs_give_the_rows_of_one_and_ctrl_c_stops_every_worker(tmp_path, monkeypatch):
    """One sweep in two workers, interrupted once two runs came back (spawning workers is the slow
    part of this test, so it is done once)."""
    grid = {"r": [2, 4], "lora_dropout": [0.0, 0.1]}  # dropout: the workers' random draws match too
    one = compare.sweep(BASE, grid, out_dir=tmp_path / "one")
    out = tmp_path / "two"
    said = []

    def interrupt_at_the_last_run(msg):
        said.append(msg)
        if msg.startswith("run 4/4"):  # two runs came back; Ctrl-C before the last one starts
            raise KeyboardInterrupt
    with pytest.raises(SweepInterrupted) as e:
        compare.sweep(BASE, grid, out_dir=out, jobs=2, progress=interrupt_at_the_last_run)
    assert multiprocessing.active_children() == []  # every worker stopped and joined
    workers = {m.split("(worker ")[1].split(",")[0] for m in said if "(worker " in m}
    assert len(workers) == 2
    done = e.value.rows
    assert 2 <= len(done) <= 3 and all(r["error"] == "" for r in done)
    by_folder = {Path(r["output_dir"]).name: _same_run(r) for r in one}
    assert [_same_run(r) for r in done] == [by_folder[Path(r["output_dir"]).name] for r in done]
    saved = json.loads((out / "results.json").read_text())["rows"]
    assert [{k: v for k, v in r.items() if k != "config"} for r in saved] == done
    for r in done:  # each worker's console output went to its run's folder, not the terminal
        assert "trained 2 steps" in (Path(r["output_dir"]) / CONSOLE).read_text()

    import train

    real, calls = train.run, []
    monkeypatch.setattr(train, "run", lambda cfg: calls.append(Path(cfg.output_dir).name) or real(cfg))
    rows = compare.sweep(BASE, grid, out_dir=out)
    assert sorted(calls) == sorted(set(by_folder) - {Path(r["output_dir"]).name for r in done})
    assert [_same_run(r) for r in rows] == [_same_run(r) for r in one]
