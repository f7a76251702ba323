"""A 2x2 sweep through train.run writes results.csv, results.json and results.png; a sweep never
loses earlier results (atomic writes, merged rows, failed settings named, Ctrl-C saves what finished)."""
import csv
import json
import math
import re
from pathlib import Path

import pytest
from sweep_fakes import fake_result

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


@pytest.mark.slow
def test_sweep_2x2_over_dora_and_init(tmp_path, capsys):
    """The LoRA variants are grid keys like any TrainConfig field (issue 13): DoRA x PiSSA."""
    out = tmp_path / "variants"
    sets = [a for k, v in BASE.items() if k != "max_steps" for a in ("--set", f"{k}={v}")]
    assert main(["sweep", "--grid", "use_dora=false,true", "--grid", "init_lora_weights=true,pissa", *sets,
                 "--max-steps", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["use_dora"], r["init_lora_weights"]) for r in rows] == [
        (False, "true"), (False, "pissa"), (True, "true"), (True, "pissa")]
    assert all(r["error"] == "" and math.isfinite(r["eval_loss"]) for r in rows), rows
    conf = json.loads((Path(rows[-1]["output_dir"]) / "adapter" / "adapter_config.json").read_text())
    assert (conf["use_dora"], conf["init_lora_weights"]) == (True, "pissa")


@pytest.mark.parametrize("grid, match", [
    (["init_lora_weights=true,corda"], "init_lora_weights='corda' is not valid"),
    (["use_dora=true", "lora_bias=false,true"], r"setting \{'use_dora': True, 'lora_bias': True\}: LoRA options"),
])
def test_sweep_refuses_bad_variant_values_before_any_run(tmp_path, capsys, fake_train, grid, match):
    calls = fake_train(lambda cfg: fake_result())
    args = [a for g in grid for a in ("--grid", g)]
    assert main(["sweep", *args, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert calls == [] and not (tmp_path / "bad").exists()


# ---- nothing of an earlier sweep is lost ----------------------------------------------------------

def test_a_sweep_in_which_every_run_fails_keeps_the_earlier_results_and_exits_1(tmp_path, fake_train, capsys):
    out = tmp_path / "sw"
    fake_train(lambda cfg: fake_result(loss=4.0 if cfg.r == 4 else 3.0))
    assert main(["sweep", "--grid", "r=4,8", "--out", str(out)]) == 0
    good = json.loads((out / "results.json").read_text())["rows"]

    def boom(cfg):
        raise RuntimeError(f"no luck with r={cfg.r}")
    fake_train(boom)
    capsys.readouterr()
    assert main(["sweep", "--grid", "r=16,32", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error: 2 of 2 settings failed: r=16 (RuntimeError: no luck with r=16); r=32 (RuntimeError: " in err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[:2] == good  # the earlier sweep's rows, untouched
    assert [(r["r"], r["error"][:12]) for r in rows[2:]] == [(16, "RuntimeError"), (32, "RuntimeError")]
    with open(out / "results.csv") as f:
        assert [r["eval_loss"] for r in csv.DictReader(f)] == ["4.0", "3.0", "", ""]


def test_a_failed_rerun_never_replaces_the_row_of_an_earlier_good_run(tmp_path, fake_train):
    out = tmp_path / "sw"
    fake_train(lambda cfg: fake_result(3.5))
    compare.sweep(None, {"r": [4]}, out_dir=out)

    def boom(cfg):
        raise RuntimeError("diverged")
    calls = fake_train(boom)
    # A plain rerun reuses the finished run; force reruns it, replacing its folder (train keeps the
    # earlier run until the new one is valid), and the failure leaves the earlier row.
    assert compare.sweep(None, {"r": [4]}, out_dir=out)[0]["eval_loss"] == 3.5 and calls == []
    rows = compare.sweep(None, {"r": [4]}, out_dir=out, force=True)
    assert rows[0]["error"] == "RuntimeError: diverged" and calls[0].overwrite_output_dir
    kept = json.loads((out / "results.json").read_text())["rows"]
    assert len(kept) == 1 and kept[0]["eval_loss"] == 3.5 and kept[0]["error"] == ""
    # The folder's record still names the finished run: the next sweep reuses it again.
    assert compare.sweep(None, {"r": [4]}, out_dir=out)[0]["eval_loss"] == 3.5 and len(calls) == 1


def test_a_run_folder_holding_another_settings_run_is_refused_up_front(tmp_path, fake_train):
    out = tmp_path / "sw"
    fake_train(lambda cfg: fake_result(3.5))
    run_dir = Path(compare.sweep(None, {"r": [4]}, out_dir=out)[0]["output_dir"])
    record = json.loads((run_dir / "sweep_run.json").read_text())
    record["key"]["learning_rate"] = 0.5  # as if this folder held a run of another setting
    (run_dir / "sweep_run.json").write_text(json.dumps(record))
    calls = fake_train(lambda cfg: fake_result(3.0))
    with pytest.raises(compare.CompareError, match=r"holds a run of another setting \(adapter/, log.jsonl; its "
                                                   r"sweep_run.json names another full setting\); use another "
                                                   r"--out, or --set overwrite_output_dir=true"):
        compare.sweep(None, {"r": [4]}, out_dir=out)
    assert calls == []
    rows = compare.sweep({"overwrite_output_dir": True}, {"r": [4]}, out_dir=out)
    assert rows[0]["eval_loss"] == 3.0 and len(calls) == 1


def test_an_unfinished_attempt_of_the_same_setting_is_run_again_in_its_folder(tmp_path, fake_train):
    out = tmp_path / "sw"

    def boom(cfg):
        raise RuntimeError("diverged")
    fake_train(boom)
    run_dir = Path(compare.sweep(None, {"r": [4]}, out_dir=out)[0]["output_dir"])
    run_dir.mkdir(parents=True)
    (run_dir / "log.jsonl").write_text('{"step": 0}\n')  # what the failed attempt left, no record
    calls = fake_train(lambda cfg: fake_result(3.0))
    rows = compare.sweep(None, {"r": [4]}, out_dir=out)
    assert rows[0]["eval_loss"] == 3.0 and calls[0].overwrite_output_dir
    assert rows[0]["output_dir"] == str(run_dir)


def test_ctrl_c_stops_the_sweep_with_the_finished_rows_saved(tmp_path, fake_train, capsys):
    out = tmp_path / "sw"

    def second_is_interrupted(cfg):
        if cfg.r == 8:
            raise KeyboardInterrupt
        return fake_result()
    calls = fake_train(second_is_interrupted)
    assert main(["sweep", "--grid", "r=4,8,16", "--out", str(out)]) == 130
    assert [c.r for c in calls] == [4, 8]  # r=16 never started
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["r"], r["error"]) for r in rows] == [(4, "")]
    assert "sweep interrupted after 1 finished run(s)" in capsys.readouterr().err


def test_train_interrupted_inside_a_run_stops_the_sweep_too(tmp_path, fake_train):
    import train

    def interrupted(cfg):
        raise train.TrainInterrupted(3, None)
    fake_train(interrupted)
    with pytest.raises(compare.ablation.SweepInterrupted):
        compare.sweep(None, {"r": [4, 8]}, out_dir=tmp_path / "sw")


@pytest.mark.parametrize("grid, expect", [
    ("r=4,0", "r='0' is not valid: must be > 0"),
    ("learning_rate=1e-3,nan", "learning_rate='nan' is not valid: must be finite and in (0, "),
    ("lora_dropout=0.5,1.0", "lora_dropout='1.0' is not valid: must be finite and in [0, 1)"),
    ("logging_steps=0", "logging_steps='0' is not valid: must be > 0"),
    ("seed=-1", "seed='-1' is not valid: must be in [0, 4294967295]"),
])
def test_grid_values_are_checked_against_the_fields_definitions_before_any_run(tmp_path, fake_train, capsys,
                                                                               grid, expect):
    calls = fake_train(lambda cfg: fake_result())
    out = tmp_path / "sw"
    assert main(["sweep", "--grid", grid, "--out", str(out)]) == 2
    assert expect in capsys.readouterr().err
    assert calls == [] and not out.exists()


def test_every_setting_is_checked_as_train_would_before_the_first_run(tmp_path, fake_train, capsys):
    """A setting train would refuse (here: targets that match nothing) stops the sweep before any run."""
    calls = fake_train(lambda cfg: fake_result())
    assert main(["sweep", "--grid", "target_modules=q_proj,nope", "--out", str(tmp_path / "sw")]) == 2
    assert "setting {'target_modules': 'nope'}: --target-modules nope:" in capsys.readouterr().err
    assert calls == []


def test_results_are_written_atomically(tmp_path, fake_train, monkeypatch):
    import compare.report as report

    out = tmp_path / "sw"
    fake_train(lambda cfg: fake_result(4.0))
    compare.sweep(None, {"r": [4]}, out_dir=out)
    before = {p: (out / p).read_bytes() for p in ("results.csv", "results.json")}

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(report.os, "fsync", full)
    with pytest.raises(OSError):
        compare.sweep(None, {"r": [8]}, out_dir=out)
    assert {p: (out / p).read_bytes() for p in before} == before  # old files whole
    assert not list(out.glob(".*tmp*"))


def test_an_unreadable_earlier_results_file_is_never_overwritten(tmp_path, fake_train):
    out = tmp_path / "sw"
    out.mkdir()
    (out / "results.json").write_text("{not json")
    calls = fake_train(lambda cfg: fake_result())
    with pytest.raises(compare.CompareError, match="results.json exists but cannot be read"):
        compare.sweep(None, {"r": [4]}, out_dir=out)
    assert calls == [] and (out / "results.json").read_text() == "{not json"
