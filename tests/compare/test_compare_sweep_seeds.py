"""Sweeps with seeds (summary: mean, sample std, n per setting), resume keyed by the full setting,
and `compare analyze` on every run against a reference run."""
import csv
import json
import math
from pathlib import Path

import pytest
from sweep_fakes import fake_result

import compare
from compare.__main__ import main

# Tiny real runs: 2 optimizer steps on short sequences, a 24-example eval split, no checkpoints.
BASE = {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 48, "eval_split_size": 0.02,
        "per_device_eval_batch_size": 24}
TRAINING = ("eval_loss", "eval_loss_before", "train_loss", "tag_exact_match")  # what a run computes
TIMING = ("step_time_s", "tokens_per_s", "seconds")  # what differs from one run of the same setting to the next


def _count_runs(monkeypatch):
    """train.run still runs, and every config it gets is recorded."""
    import train

    real, calls = train.run, []

    def counted(cfg):
        calls.append(cfg)
        return real(cfg)
    monkeypatch.setattr(train, "run", counted)
    return calls


def _training(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.slow
def test_a_rerun_reuses_finished_runs_and_reruns_what_changed(tmp_path, monkeypatch):
    out = tmp_path / "sw"
    first = compare.sweep(BASE, {"r": [2, 4]}, out_dir=out, seeds=2)
    assert [(r["r"], r["seed"], r["error"]) for r in first] == [(2, 42, ""), (2, 43, ""), (4, 42, ""), (4, 43, "")]
    dirs = [Path(r["output_dir"]) for r in first]
    assert len(set(dirs)) == 4 and all((d / "adapter" / "adapter_config.json").is_file() for d in dirs)
    assert all(d.name.startswith(f"r-{r['r']}_seed-{r['seed']}_") for d, r in zip(dirs, first))

    calls = _count_runs(monkeypatch)
    assert compare.sweep(BASE, {"r": [2, 4]}, out_dir=out, seeds=2) == first  # nothing runs: identical rows
    assert calls == []

    grown = compare.sweep(BASE, {"r": [2, 4, 8]}, out_dir=out, seeds=2)  # only the new setting runs
    assert [(c.r, c.seed) for c in calls] == [(8, 42), (8, 43)] and grown[:4] == first

    # Another base config is another full setting: it runs, in a folder of its own.
    changed = compare.sweep({**BASE, "learning_rate": 1e-3}, {"r": [2]}, out_dir=out)
    assert len(calls) == 3 and calls[-1].learning_rate == 1e-3
    assert changed[0]["output_dir"] not in {r["output_dir"] for r in grown}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["group_keys"] == ["r", "learning_rate"]  # the field the two base configs set apart
    assert [(g["r"], g["learning_rate"], g["runs"]) for g in summary["groups"]] == [
        (2, 0.003, 2), (4, 0.003, 2), (8, 0.003, 2), (2, 0.001, 1)]
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 7

    # force reruns every run of the sweep in its own folder; the runs are deterministic.
    forced = compare.sweep(BASE, {"r": [2]}, out_dir=out, seeds=2, force=True)
    assert len(calls) == 5 and all(c.overwrite_output_dir for c in calls[3:])
    assert _training(forced) == _training(first[:2])


def test_seeds_aggregate_to_the_mean_and_sample_std_of_their_rows(tmp_path, fake_train, capsys):
    out = tmp_path / "sw"

    def loss(cfg):
        if (cfg.r, cfg.seed) == (8, 9):
            raise RuntimeError("diverged")
        return fake_result(loss=1.0 + cfg.r / 10 + (cfg.seed - 7) ** 2 / 7, tokens_per_s=100.0 * cfg.seed)
    calls = fake_train(loss)
    assert main(["sweep", "--grid", "r=4,8", "--seeds", "3", "--set", "seed=7", "--out", str(out)]) == 1
    assert [(c.r, c.seed) for c in calls] == [(4, 7), (4, 8), (4, 9), (8, 7), (8, 8), (8, 9)]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 6  # one row per run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["group_keys"] == ["r"] and "ddof=1" in summary["std"]
    for g in summary["groups"]:
        mine = [r for r in rows if r["r"] == g["r"] and not r["error"]]
        for m in ("eval_loss", "train_loss", "step_time_s", "tokens_per_s"):
            xs = [r[m] for r in mine]
            mean = sum(xs) / len(xs)
            std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))  # sample std, by hand
            assert g[f"{m}_n"] == len(xs) and g[f"{m}_mean"] == pytest.approx(mean, rel=1e-12)
            assert g[f"{m}_std"] == pytest.approx(std, rel=1e-12, abs=1e-15)
        assert g["tag_exact_match_n"] == 0 and g["tag_exact_match_mean"] is None
    assert [(g["runs"], g["failed"], g["eval_loss_n"], g["seeds"]) for g in summary["groups"]] == [
        (3, 0, 3, [7, 8, 9]), (3, 1, 2, [7, 8, 9])]
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["r"] for t in table] == ["4", "8"] and float(table[0]["eval_loss_std"]) > 0
    printed = capsys.readouterr().out
    assert "per setting, over its seeds:" in printed and "mean +- sample std (ddof=1)" in printed

    # One run of a setting: n = 1 and no std; --seeds alone (no --grid) sweeps the base config.
    assert main(["sweep", "--seeds", "1", "--set", "seed=3", "--out", str(tmp_path / "one")]) == 0
    (group,) = json.loads((tmp_path / "one" / "summary.json").read_text())["groups"]
    assert group["eval_loss_n"] == 1 and group["eval_loss_std"] is None and group["seeds"] == [3]


@pytest.mark.parametrize("args, expect", [
    (["--grid", "seed=1,2", "--seeds", "2"], "either as --seeds N or as the grid key seed, not both"),
    (["--grid", "r=4", "--seeds", "2", "--set", f"seed={2**32 - 1}"], "seed=4294967296 is not valid"),
    (["--grid", "r=4,8", "--seeds", "2", "--analyze-against", "seed=7"],
     "--analyze-against seed=7: the reference of {'r': 4, 'seed': 42} would be {'r': 4, 'seed': 7}, which is "
     "not a run of this sweep (its values: {'seed': [42, 43]})"),
    (["--grid", "r=4", "--analyze-against", "lora_alpha=4"],
     "--analyze-against lora_alpha=4: write KEY=VALUE[,KEY=VALUE] with grid keys of this sweep (r)"),
    (["--grid", "r=4", "--seeds", "2", "--analyze-against", "seed=forty"],
     "seed='forty': expected a value of type int"),
    (["--grid", "r=4", "--analyze-against", "{tmp}"], "no adapter_config.json"),
])
def test_bad_seeds_and_references_are_refused_before_any_run(tmp_path, fake_train, capsys, args, expect):
    calls = fake_train(lambda cfg: fake_result())
    out = tmp_path / "sw"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["sweep", *args, "--out", str(out)]) == 2
    assert expect in capsys.readouterr().err
    assert calls == [] and not out.exists()


@pytest.mark.slow
def test_every_run_is_analysed_against_its_reference_run(tmp_path, monkeypatch):
    out = tmp_path / "sw"
    rows = compare.sweep(BASE, {"r": [2]}, out_dir=out, seeds=2, analyze_against="seed=42")
    ref, other = (Path(r["output_dir"]) for r in rows)
    # The reference run is analysed alone (no phi); the other one against it.
    assert rows[0]["analysis_against"] == "" and rows[0]["phi_11"] is None
    assert rows[1]["analysis_against"] == str(ref / "adapter") and rows[1]["analysis_error"] == ""
    analysis = json.loads((other / "analysis" / ref.name / "analysis.json").read_text())
    assert (other / "analysis" / ref.name / "subspace_similarity.png").is_file()
    assert (ref / "analysis" / "self" / "analysis.json").is_file()
    layers = list(analysis["layers"].values())
    phis = [s["subspace_similarity"] for s in layers]
    assert rows[1]["phi_11"] == pytest.approx(sum(p[0][0] for p in phis) / len(phis))
    assert rows[1]["phi_diag"] == pytest.approx(sum((p[0][0] + p[1][1]) / 2 for p in phis) / len(phis))
    assert rows[1]["phi_random"] == pytest.approx(sum(1.5 / s["ambient_dim"] for s in layers) / len(layers))
    assert all(1 <= r["effective_rank"] <= 2 for r in rows)
    summary = json.loads((out / "summary.json").read_text())["groups"][0]
    assert summary["effective_rank_n"] == 2 and summary["phi_diag_n"] == 1
    assert summary["phi_diag_mean"] == rows[1]["phi_diag"]
    with open(out / "results.csv") as f:
        assert {"effective_rank", "phi_11", "phi_diag", "phi_random"} <= set(next(csv.DictReader(f)))

    # Against a fixed folder, in a rerun that trains nothing: the run compared with itself has
    # phi(i, i) = 1, and the analysis against the first reference is still in its folder.
    calls = _count_runs(monkeypatch)
    again = compare.sweep(BASE, {"r": [2]}, out_dir=out, seeds=2, analyze_against=other,
                          analyze_subspace="delta_right")
    assert calls == [] and again[1]["phi_diag"] == pytest.approx(1.0)
    folder = next(p for p in (other / "analysis").iterdir() if p.name.startswith(other.name))
    assert json.loads((folder / "analysis.json").read_text())["subspace"] == "delta_right"
    assert again[0]["analysis_against"] == str(other) and again[0]["phi_11"] is not None
    assert (other / "analysis" / ref.name / "analysis.json").is_file()
    # A later sweep without analysis keeps the columns of the runs it reuses.
    assert compare.sweep(BASE, {"r": [2]}, out_dir=out, seeds=2)[1]["phi_diag"] == again[1]["phi_diag"]


def test_a_run_that_cannot_be_analysed_gets_its_error_in_the_analysis_columns(tmp_path, fake_train):
    """References as a dict of grid values; the fake runs leave an adapter config without weights."""
    fake_train(lambda cfg: fake_result())
    rows = compare.sweep(None, {"r": [4, 8]}, out_dir=tmp_path / "sw", analyze_against={"r": 8})
    assert [r["error"] for r in rows] == ["", ""]  # the runs themselves finished
    assert rows[0]["analysis_against"] == str(Path(rows[1]["output_dir"]) / "adapter")
    assert all("adapter" in r["analysis_error"] and r["phi_diag"] is None for r in rows)
    with pytest.raises(compare.CompareError, match="unknown analysis subspace 'U'"):
        compare.sweep(None, {"r": [4]}, out_dir=tmp_path / "sw", analyze_against={"r": 4}, analyze_subspace="U")
