"""Ablation sweeps: short trainings through `train.run` over a grid of TrainConfig fields.

    rows = compare.sweep({"max_steps": 20}, {"r": [4, 8], "quantization": ["none", "nf4"]},
                         out_dir="sweep_out", seeds=3, jobs=2, analyze_against="seed=42")

writes sweep_out/results.csv and results.json (one row per run), summary.csv and summary.json
(mean, sample std and n per setting over its seeds: compare/sweep_stats.py), results.png (the
means with +-1 std whiskers), and one folder per run, sweep_out/runs/<grid values>_<id>/, holding
train's log.jsonl and adapter/ plus `sweep_run.json`: the run's full resolved setting (its
TrainConfig without the fields that only say where outputs go, OUTPUT_ONLY) and its row. <id> is a
hash of that setting, so a folder name is unique per full setting and seed.

Before the first run, every grid key and value is checked against TrainConfig's own definitions
(names, types, choices, numeric ranges: train.config), and every setting's whole config and run
folder as train would check them.

Resume: a run whose folder holds a finished run of exactly its full setting (sweep_run.json says
so and adapter/ is there) is not run again; its recorded row is reused (`force=True` reruns it).
A folder with an unfinished attempt of the same setting (a failed or interrupted run, no record)
is rerun with overwrite_output_dir, which keeps the attempt until the new run is valid; a folder
whose record names another setting is refused up front unless `overwrite_output_dir` is set.

Nothing earlier is lost: results are written atomically (a temporary file renamed over the old
one) and merged with the earlier results.json by run folder, where a failed run never replaces
the row of an earlier successful run (train keeps that run's folder too). Ctrl-C stops the whole
sweep (SweepInterrupted) after saving the rows that finished. `jobs > 1` runs the settings in
worker processes (compare/sweep_jobs.py); `analyze_against` runs `compare.analyze` on every
finished run against a reference run (compare/sweep_analysis.py).

The parts: `plan` (every run, checked, with what an earlier sweep already finished),
`run_setting` (one training -> one row and its record), `write_results` (merge + write).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from .models import CompareError
from .plots import plot_sweep
from .report import check_writable_dir, jsonable, table, write_json, write_text
from .sweep_stats import STATS_METRICS, summarise

# Fields a sweep sets itself for each run (or that make no sense per grid point).
RESERVED = ("output_dir", "resume_from_checkpoint")
# Small defaults for a sweep when the caller gives no base config: short runs, no checkpoints,
# no generation samples, so a grid of tiny runs finishes in CI time.
SWEEP_DEFAULTS = {"max_steps": 20, "eval_steps": 0, "save_steps": 0, "logging_steps": 5,
                  "tag_eval_samples": 0, "num_sample_generations": 0, "report_to": "none"}
METRICS = ["eval_loss", "eval_loss_before", "train_loss", "step_time_s", "tokens_per_s", "tag_exact_match"]
# TrainConfig fields that only say where and how a run's outputs are written, never what it
# computes: they are left out of a run's full setting (its resume key and folder id).
OUTPUT_ONLY = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "report_to")
RECORD = "sweep_run.json"  # in each run folder: {"key": full setting, "row": its row}, once it finished
# What `analyze_against` adds to a row (compare/sweep_analysis.py says what each one is).
ANALYSIS_COLUMNS = ["analysis_against", "effective_rank", "phi_11", "phi_diag", "phi_random", "analysis_error"]


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep. `.rows`: the settings that finished (saved in results.*)."""

    def __init__(self, rows: list[dict], out: Path):
        super().__init__(f"sweep interrupted after {len(rows)} finished run(s); their rows are saved in "
                         f"{out}/results.csv and results.json")
        self.rows = rows


def _train():
    try:
        import train
        from train.config import TrainConfig
    except ImportError as e:
        raise CompareError(f"the train package cannot be imported ({e}); sweep runs train.run") from None
    if not hasattr(train, "run"):
        raise CompareError("train.run is not available in this checkout; sweep needs train.run(TrainConfig)")
    return train, TrainConfig


def _fields(TrainConfig) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _type_name(f: dataclasses.Field) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return t.replace("typing.", "")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """`value` (a string from the CLI, or a Python value) as the field's type, checked against the
    field's valid values (train.config: choices, numeric range, finite); CompareError if not."""
    from train.config import value_problem

    t = _type_name(f)
    try:
        if t == "bool":
            if isinstance(value, bool):
                out = value
            elif str(value).lower() in ("true", "1", "yes", "on"):
                out = True
            elif str(value).lower() in ("false", "0", "no", "off"):
                out = False
            else:
                raise ValueError
        elif t == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            out = int(value)
        elif t == "float":
            out = float(value)
        else:
            out = value if not isinstance(value, (int, float)) or t != "str" else str(value)
    except (TypeError, ValueError, OverflowError):
        raise CompareError(f"{f.name}={value!r}: expected a value of type {t}") from None
    problem = value_problem(f, out)
    if problem:
        raise CompareError(f"{f.name}={value!r} is not valid: {problem}")
    return out


def parse_grid(items: Iterable[str]) -> dict[str, list[str]]:
    """["r=4,8", "quantization=none,nf4"] -> {"r": ["4", "8"], "quantization": ["none", "nf4"]}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, vals = item.partition("=")
        key = key.strip().replace("-", "_")
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not sep or not key or not values:
            raise CompareError(f"--grid {item!r}: write KEY=V1,V2 (a TrainConfig field and its values)")
        if key in grid:
            raise CompareError(f"--grid {key} given twice; put all its values in one --grid")
        grid[key] = values
    return grid


def parse_settings(items: Iterable[str]) -> dict[str, str]:
    """["max_length=64", "lora_dropout=0.1"] -> {"max_length": "64", "lora_dropout": "0.1"}."""
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise CompareError(f"--set {item!r}: write KEY=VALUE (a TrainConfig field)")
        out[key.strip().replace("-", "_")] = val.strip()
    return out


def validate_grid(TrainConfig, base: Mapping[str, Any], grid: Mapping[str, Iterable[Any]]
                  ) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Check every key and value against TrainConfig; return both coerced. Raises CompareError.
    An old field name (train.config.OLD_FIELDS: kernel) is read as its new one, with a FutureWarning."""
    from train.config import OLD_FIELDS

    for old in [k for k in (*base, *grid) if k in OLD_FIELDS]:
        warnings.warn(f"sweep key {old!r} is deprecated: use {OLD_FIELDS[old]!r}", FutureWarning, stacklevel=3)
    base = {OLD_FIELDS.get(k, k): v for k, v in base.items()}
    grid = {OLD_FIELDS.get(k, k): v for k, v in grid.items()}
    fields = _fields(TrainConfig)
    valid = ", ".join(n for n in fields if n not in RESERVED)
    for where, keys in (("grid", list(grid)), ("base config", list(base))):
        unknown = [k for k in keys if k not in fields]
        if unknown:
            raise CompareError(f"unknown {where} key(s) {unknown}; valid TrainConfig fields: {valid}")
    reserved = [k for k in grid if k in RESERVED]
    if reserved:
        raise CompareError(f"{reserved} cannot be swept: the sweep sets them per run; use --out")
    if not grid:
        raise CompareError(f"empty grid; give at least one TrainConfig field with values ({valid})")
    base_c = {k: _coerce(fields[k], v) for k, v in base.items()}
    grid_c = {}
    for k, vals in grid.items():
        vals = [vals] if isinstance(vals, (str, bytes)) or not isinstance(vals, Iterable) else list(vals)
        if not vals:
            raise CompareError(f"grid key {k!r} has no values")
        grid_c[k] = [_coerce(fields[k], v) for v in vals]
    return base_c, grid_c


def _setting_name(setting: Mapping[str, Any]) -> str:
    safe = lambda v: "".join(c if c.isalnum() or c in "._-" else "_" for c in str(v))  # noqa: E731
    return "_".join(f"{k}-{safe(v)}" for k, v in setting.items())


def setting_key(cfg) -> dict:
    """A run's full resolved setting: its TrainConfig as JSON values, without OUTPUT_ONLY fields.
    Two runs with equal keys train the same thing; resume reuses a run only for an equal key."""
    d = jsonable(cfg.to_dict())
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in OUTPUT_ONLY}))


def key_id(key: Mapping[str, Any]) -> str:
    """10 hex digits of the sha256 of a full setting: the id in its run folder's name."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def run_name(setting: Mapping[str, Any], key: Mapping[str, Any]) -> str:
    """'r-4_seed-42_3f9c2a1b7d': the grid values (readable, cut at 80 characters) and the key's id."""
    return f"{_setting_name(setting)[:80].rstrip('_-.') or 'run'}_{key_id(key)}"


def _summarise(result: Any) -> dict:
    """The numbers a sweep row keeps from a TrainResult (train/loop.py): eval loss before and after,
    the last logged train loss, mean step time (train_seconds / steps: the loop's wall time with
    the sweep's eval_steps=0, i.e. no evaluation inside it) and the median logged tokens/s."""
    log = list(getattr(result, "log", []) or [])
    train_recs = [r for r in log if "loss" in r and "tokens_per_s" in r]
    steps = getattr(result, "steps", 0) or 0
    secs = getattr(result, "train_seconds", None)
    tag = (result.after or {}).get("tag_exact_match")
    return {
        "eval_loss": (result.after or {}).get("eval_loss"),
        "eval_loss_before": (result.before or {}).get("eval_loss"),
        "train_loss": train_recs[-1]["loss"] if train_recs else None,
        "step_time_s": secs / steps if secs is not None and steps > 0 else None,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train_recs) if train_recs else None,
        "tag_exact_match": tag if isinstance(tag, (int, float)) else None,
    }


@dataclasses.dataclass
class Run:
    """One run of a sweep. setting: its grid values; config: its checked TrainConfig; key: its full
    setting (`setting_key`); done: the row of the finished earlier run of this key that the sweep
    reuses, or None when it runs."""

    setting: dict
    config: Any
    key: dict
    done: Optional[dict] = None


def sweep(base_config: Union[Mapping[str, Any], Any, None] = None,
          grid: Union[Mapping[str, Iterable[Any]], Iterable[str], None] = None,
          out_dir: Union[str, Path] = "sweep_out", max_steps: Optional[int] = None,
          progress: Optional[Callable[[str], None]] = None, *, seeds: Optional[int] = None,
          force: bool = False, jobs: int = 1, analyze_against: Union[str, Path, Mapping, None] = None,
          analyze_subspace: str = "A") -> list[dict]:
    """Run `train.run` once per point of the grid (and seed); write results.*, summary.*; return the rows.

    base_config: a TrainConfig, a dict of TrainConfig fields, or None (the embedded default with
    short-run settings, SWEEP_DEFAULTS). grid: {field: [values]} or ["field=v1,v2", ...] (may be
    empty when `seeds` is given). max_steps: overrides the steps of every run.
    seeds: N adds the grid key `seed` with the values s, s+1, ..., s+N-1, where s is the base
    config's seed (TrainConfig's default 42 unless set), so seeds=1 is the sweep without seeds.
    force: rerun runs that an earlier sweep into `out_dir` finished (else they are reused).
    jobs: worker processes running settings side by side, each with cpus // jobs torch threads
    (a script that calls this with jobs > 1 needs the usual `if __name__ == "__main__":` guard).
    analyze_against: run `compare.analyze` on every finished run against a reference: "seed=42"
    (the run of the same setting with seed 42), "r=16,seed=43" (several keys), a dict of grid
    values, or an adapter / run folder; adds the ANALYSIS_COLUMNS to each row.
    analyze_subspace: what phi compares (compare.analyze's `subspace`).

    Each row holds the setting, eval loss before and after, train loss, mean step time, tokens/s,
    tag exact match, wall seconds, the run's output dir, and `error` (empty when the run
    finished). Bad keys or values, run folders holding another setting's run, and a reference that
    is not a run of this sweep raise CompareError before any run; a failed run is a row with its
    error (see `failed`); Ctrl-C raises SweepInterrupted once the finished rows are saved.
    """
    from .sweep_analysis import analyse_runs, check_subspace, resolve_references

    train, _ = _train()
    say = progress or (lambda msg: None)
    out = Path(out_dir)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise CompareError(f"jobs must be an integer >= 1, got {jobs!r}")
    if analyze_against is not None:
        check_subspace(analyze_subspace)
    runs, keys, base = plan(base_config, grid, out, max_steps, seeds=seeds, force=force)
    refs = None if analyze_against is None else resolve_references(analyze_against, runs, keys, say)
    rows = reused_rows(runs, out)
    todo = [i for i, r in enumerate(runs) if r.done is None]
    for i, r in enumerate(runs):
        if r.done is not None:
            say(f"run {i + 1}/{len(runs)}: {r.setting} finished earlier ({r.config.output_dir}); reused")

    def finished(i: int, row: dict) -> None:
        rows[i] = row
        if row["error"]:
            say(f"run {i + 1}/{len(runs)} failed: {row['error']}")

    try:
        if jobs > 1 and len(todo) > 1:
            from .sweep_jobs import run_parallel

            run_parallel(runs, todo, jobs, finished, say)
        else:
            for i in todo:
                say(f"run {i + 1}/{len(runs)}: {runs[i].setting}")
                finished(i, run_setting(train, runs[i].setting, runs[i].config, runs[i].key))
        if refs is not None:
            analyse_runs(runs, rows, refs, analyze_subspace, say)
    except KeyboardInterrupt:  # Ctrl-C (run_setting turns train's TrainInterrupted into this)
        done = [r for r in rows if r is not None]
        write_results(done, keys, base, out, [r.config for r in runs])
        raise SweepInterrupted(done, out) from None
    write_results(rows, keys, base, out, [r.config for r in runs])
    return rows


def failed(rows: list[dict]) -> list[dict]:
    """The rows of settings whose run failed."""
    return [r for r in rows if r.get("error")]


def with_seeds(TrainConfig, base: Mapping[str, Any], grid: Mapping[str, Any], seeds: Optional[int]) -> dict:
    """`grid` plus the key `seed` = [s, s+1, ..., s+seeds-1], s the base config's seed (or
    TrainConfig's default); `grid` itself when seeds is None. The values are checked later, with
    the rest of the grid."""
    if seeds is None:
        return dict(grid)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise CompareError(f"seeds must be an integer >= 1, got {seeds!r}")
    if "seed" in grid:
        raise CompareError("give the seeds either as --seeds N or as the grid key seed, not both")
    f = _fields(TrainConfig)["seed"]
    first = _coerce(f, base["seed"]) if "seed" in base else f.default
    return {**grid, "seed": [first + i for i in range(seeds)]}


def plan(base_config, grid, out: Path, max_steps: Optional[int] = None, *, seeds: Optional[int] = None,
         force: bool = False) -> tuple[list[Run], list[str], dict]:
    """Every run of the sweep, all checked before any run: keys and values against TrainConfig's
    definitions, each whole config as train.preflight checks it (the machine, the model, the
    targets), each run folder (see `folder_state`), the output folder and an earlier results.json
    (readable, so it can be merged, never replaced). A run that an earlier sweep finished with
    the same full setting gets `done` (its row) unless `force`, and is not preflighted: it will not
    run. Returns (runs, grid keys, base config)."""
    train, TrainConfig = _train()
    if grid is None:
        if seeds is None:
            raise CompareError("sweep needs a grid: {TrainConfig field: [values]}")
        grid = {}
    if not isinstance(grid, Mapping):
        grid = parse_grid(grid)
    if base_config is None:
        base = dict(SWEEP_DEFAULTS)
    elif dataclasses.is_dataclass(base_config):
        base = {f.name: getattr(base_config, f.name) for f in dataclasses.fields(base_config)}
    else:
        base = {**SWEEP_DEFAULTS, **dict(base_config)}
    if max_steps is not None:
        if max_steps < 1:
            raise CompareError(f"max_steps must be >= 1, got {max_steps}")
        base["max_steps"] = max_steps
    base, grid = validate_grid(TrainConfig, base, with_seeds(TrainConfig, base, grid, seeds))
    check_writable_dir(out, "--out")
    earlier_results(out)  # raises if unreadable: it could not be merged
    keys = list(grid)
    settings = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    runs = []
    for s in settings:  # build and check every config first: nothing runs if one is invalid
        try:
            cfg = TrainConfig(**{**base, **s})
        except (TypeError, ValueError) as e:
            raise CompareError(f"setting {s}: {e}") from None
        key = setting_key(cfg)
        cfg = dataclasses.replace(cfg, output_dir=str(out / "runs" / run_name(s, key)))
        done = None if force else finished_row(Path(cfg.output_dir), key)
        if done is None:
            if folder_state(cfg, key, s) == "attempt":
                cfg = dataclasses.replace(cfg, overwrite_output_dir=True)
            try:
                train.preflight(cfg)
            except train.TrainError as e:
                raise CompareError(f"setting {s}: {e}") from None
        runs.append(Run(s, cfg, key, done))
    return runs, keys, base


def _record(run_dir: Path) -> Optional[dict]:
    """The run folder's sweep_run.json; None if there is none, {} if it cannot be read."""
    path = run_dir / RECORD
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def finished_row(run_dir: Path, key: dict) -> Optional[dict]:
    """The recorded row of the finished run in `run_dir` when it ran exactly `key` and its adapter
    is there; else None (the run has to run)."""
    rec = _record(run_dir)
    if not rec or rec.get("key") != key or not isinstance(rec.get("row"), dict):
        return None
    if rec["row"].get("error") or not (run_dir / "adapter" / "adapter_config.json").is_file():
        return None
    return {**rec["row"], "output_dir": str(run_dir)}


def folder_state(cfg, key: dict, setting: dict) -> str:
    """What the run folder of a run that has to run holds: "empty"; "attempt" (an earlier attempt
    at this same setting that did not finish, no record of another setting, or a finished run
    that `force` reruns: it is replaced, and kept by train until the new run is valid); or a run
    of another setting, which raises CompareError unless the config sets overwrite_output_dir."""
    from train.outputs import describe, run_entries

    run_dir = Path(cfg.output_dir)
    entries = run_entries(run_dir)
    if not entries:
        return "empty"
    rec = _record(run_dir)
    if rec is None or rec.get("key") == key or cfg.overwrite_output_dir:
        return "attempt"
    raise CompareError(f"setting {setting}: its run folder {run_dir} holds a run of another setting "
                       f"({describe(entries)}; its {RECORD} names another full setting); use another --out, "
                       f"or --set overwrite_output_dir=true to replace it (kept if its new run fails)")


def reused_rows(runs: list[Run], out: Path) -> list[Optional[dict]]:
    """Per run, the row it reuses (None: it runs), with the analysis columns an earlier sweep added
    to that row in results.json: they describe the same adapter."""
    earlier = {r["output_dir"]: r for r in earlier_results(out)}
    rows: list[Optional[dict]] = []
    for r in runs:
        if r.done is None:
            rows.append(None)
            continue
        old = earlier.get(r.done["output_dir"], {})
        rows.append({**{k: old[k] for k in ANALYSIS_COLUMNS if k in old}, **r.done})
    return rows


def run_setting(train, setting: dict, cfg, key: Optional[dict] = None) -> dict:
    """Train one setting; its row (metrics, seconds, output_dir, and `error`: '' when it finished).
    A finished run with a `key` also writes its record (sweep_run.json) into its folder, which is
    what a later sweep reuses. A failed run is a result of the sweep, not the end of it; Ctrl-C is
    (KeyboardInterrupt)."""
    t0 = time.perf_counter()
    row = {**setting, **{m: None for m in METRICS}}
    try:
        row.update(_summarise(train.run(cfg)))
        row["error"] = ""
    except train.TrainInterrupted as e:
        raise KeyboardInterrupt(str(e)) from None
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    row["seconds"] = time.perf_counter() - t0
    row["output_dir"] = cfg.output_dir
    if not row["error"] and key is not None:
        try:
            write_json(Path(cfg.output_dir) / RECORD, {"key": key, "row": row})
        except OSError as e:
            row["error"] = f"the run finished, but its {RECORD} could not be written ({e.strerror or e})"
    return row


def earlier_results(out: Path) -> list[dict]:
    """The rows of an earlier sweep's results.json in `out` ([] if none); CompareError if the file
    exists but cannot be read (then it is never overwritten)."""
    path = out / "results.json"
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())["rows"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "output_dir" in r for r in rows):
            raise ValueError("rows without output_dir")
        return rows
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CompareError(f"{path} exists but cannot be read ({e}); move it away or use another --out "
                           f"(a sweep merges its rows into it, never replaces it)") from None


def write_results(rows: list[dict], keys: list[str], base: Mapping[str, Any], out: Path,
                  configs: Iterable[Any] = ()) -> list[dict]:
    """Merge this sweep's rows into out/results.* and write results.csv, results.json, summary.csv,
    summary.json and results.png (each to a temporary name, then renamed). Returns the merged rows.

    Rows are matched by run folder (output_dir): a new row replaces the earlier one unless the new
    run failed and the earlier one had not (the earlier run's folder is still there, untouched);
    earlier rows of other settings are kept. JSON rows also carry each run's full config. The
    summary groups the merged rows by setting (sweep_stats.summarise).
    """
    by_dir = {r["output_dir"]: r for r in earlier_results(out)}
    config_of = {c.output_dir: jsonable(c.to_dict()) for c in configs}
    for r in rows:
        old = by_dir.get(r["output_dir"])
        if r.get("error") and old is not None and not old.get("error"):
            continue
        by_dir[r["output_dir"]] = {**r, "config": config_of.get(r["output_dir"])}
    merged = list(by_dir.values())
    # The grid keys of this sweep first, then those only earlier sweeps had (blank in other rows).
    all_keys = list(dict.fromkeys(list(keys) + [k for r in merged for k in r if k not in _ROW_FIELDS]))
    analysis = [c for c in ANALYSIS_COLUMNS if any(c in r for r in merged)]
    cols = all_keys + METRICS + analysis + ["seconds", "error", "output_dir"]
    groups, group_keys = summarise(merged, all_keys)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.csv", _csv(merged, cols))
    write_json(out / "results.json", {"grid_keys": all_keys, "base_config": jsonable(dict(base)), "rows": merged})
    stat_cols = [f"{m}_{s}" for m in STATS_METRICS for s in ("mean", "std", "n")
                 if any(f"{m}_mean" in g for g in groups)]
    write_text(out / "summary.csv", _csv(groups, group_keys + ["runs", "failed", "seeds"] + stat_cols))
    write_json(out / "summary.json", {
        "group_keys": group_keys, "metrics": [m for m in STATS_METRICS if any(f"{m}_mean" in g for g in groups)],
        "std": "sample standard deviation over the finished runs of a setting (ddof=1: n-1 in the "
               "denominator); null when n < 2",
        "groups": groups})
    plot_sweep(groups, group_keys, out / "results.png")
    return merged


def _csv(rows: list[dict], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else
                        " ".join(map(str, r[k])) if isinstance(r.get(k), list) else r.get(k)) for k in cols})
    return buf.getvalue()


_ROW_FIELDS = set(METRICS) | set(ANALYSIS_COLUMNS) | {"seconds", "error", "output_dir", "config"}


def format_rows(rows: list[dict]) -> str:
    """Aligned table of a sweep's rows (settings first, then the metrics and analysis columns)."""
    if not rows:
        return "(no runs)"
    metric_cols = ["eval_loss_before", "eval_loss", "train_loss", "step_time_s", "tokens_per_s",
                   "tag_exact_match", "seconds", "error"]
    keys = [k for k in rows[0] if k not in metric_cols + ["output_dir"] and k not in ANALYSIS_COLUMNS]
    analysed = any("effective_rank" in r for r in rows)
    headers = keys + ["eval loss before", "eval loss", "train loss", "step ms", "tokens/s", "wall s"]
    headers += ["eff. rank", "phi(1,1)", "phi diag", "random"] if analysed else []
    body = []
    for r in rows:
        st = r.get("step_time_s")
        line = [r[k] for k in keys] + [r.get("eval_loss_before"), r.get("eval_loss"), r.get("train_loss"),
                                       None if st is None else st * 1e3, r.get("tokens_per_s"), r.get("seconds")]
        if analysed:
            line += [r.get("effective_rank"), r.get("phi_11"), r.get("phi_diag"), r.get("phi_random")]
        body.append(line + [r.get("error") or r.get("analysis_error") or ""])
    return table(headers + ["error"], body)
