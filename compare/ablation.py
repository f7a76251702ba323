"""Ablation sweeps: short trainings through `train.run` over a grid of TrainConfig fields.

    rows = compare.sweep({"max_steps": 20}, {"r": [4, 8], "quantization": ["none", "nf4"]},
                         out_dir="sweep_out")

writes sweep_out/results.csv, results.json and results.png (eval loss and step time per setting),
one training run per grid point under sweep_out/runs/<setting>/. Before the first run, every grid
key and value is checked against TrainConfig's own definitions (names, types, choices, numeric
ranges: train.config), and every setting's whole config and run folder as train would check them.

Nothing earlier is lost: results are written atomically (a temporary file renamed over the old
one) and merged with the earlier results.json by run folder, where a failed run never replaces
the row of an earlier successful run (train keeps that run's folder too); a run folder that holds an
earlier run is refused up front unless `overwrite_output_dir` is set. Ctrl-C stops the whole sweep
(SweepInterrupted) after saving the rows that finished.

The parts, so seeds, resume and parallel jobs can be added beside them: `plan` (settings and their
checked configs), `run_setting` (one training -> one row), `write_results` (merge + write).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from .models import CompareError
from .plots import plot_sweep
from .report import check_writable_dir, jsonable, table, write_json, write_text

# Fields a sweep sets itself for each run (or that make no sense per grid point).
RESERVED = ("output_dir", "resume_from_checkpoint")
# Small defaults for a sweep when the caller gives no base config: short runs, no checkpoints,
# no generation samples, so a grid of tiny runs finishes in CI time.
SWEEP_DEFAULTS = {"max_steps": 20, "eval_steps": 0, "save_steps": 0, "logging_steps": 5,
                  "tag_eval_samples": 0, "num_sample_generations": 0, "report_to": "none"}
METRICS = ["eval_loss", "eval_loss_before", "train_loss", "step_time_s", "tokens_per_s", "tag_exact_match"]


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
    """Check every key and value against TrainConfig; return both coerced. Raises CompareError."""
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


def sweep(base_config: Union[Mapping[str, Any], Any, None] = None,
          grid: Union[Mapping[str, Iterable[Any]], Iterable[str], None] = None,
          out_dir: Union[str, Path] = "sweep_out", max_steps: Optional[int] = None,
          progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Run `train.run` once per point of the grid; write results.csv/.json/.png; return the rows.

    base_config: a TrainConfig, a dict of TrainConfig fields, or None (the embedded default with
    short-run settings, SWEEP_DEFAULTS). grid: {field: [values]} or ["field=v1,v2", ...].
    max_steps: overrides the steps of every run. Each row holds the setting, eval loss before and
    after, train loss, median step time, tokens/s, wall seconds, the run's output dir, and `error`
    (empty when the run finished). Bad keys or values, and run folders holding an earlier run,
    raise CompareError before any run; a failed run is a row with its error (see `failed`);
    Ctrl-C raises SweepInterrupted once the finished rows are saved.
    """
    train, _ = _train()
    say = progress or (lambda msg: None)
    out = Path(out_dir)
    settings, configs, keys, base = plan(base_config, grid, out, max_steps)
    rows: list[dict] = []
    for i, (s, cfg) in enumerate(zip(settings, configs)):
        say(f"run {i + 1}/{len(settings)}: {s}")
        try:
            rows.append(run_setting(train, s, cfg))
        except KeyboardInterrupt:  # Ctrl-C (run_setting turns train's TrainInterrupted into this)
            write_results(rows, keys, base, out, configs)
            raise SweepInterrupted(rows, out) from None
        if rows[-1]["error"]:
            say(f"run {i + 1}/{len(settings)} failed: {rows[-1]['error']}")
    write_results(rows, keys, base, out, configs)
    return rows


def failed(rows: list[dict]) -> list[dict]:
    """The rows of settings whose run failed."""
    return [r for r in rows if r.get("error")]


def plan(base_config, grid, out: Path, max_steps: Optional[int] = None
         ) -> tuple[list[dict], list[Any], list[str], dict]:
    """Every setting of the grid and its TrainConfig, all checked before any run: keys and values
    against TrainConfig's definitions, each whole config as train.preflight checks it (the machine,
    the model, the targets), each run folder (no earlier run unless overwrite_output_dir), the
    output folder and an earlier results.json (readable, so it can be merged, never replaced).
    Returns (settings, configs, grid keys, base config)."""
    train, TrainConfig = _train()
    if grid is None:
        raise CompareError("sweep needs a grid: {TrainConfig field: [values]}")
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
    base, grid = validate_grid(TrainConfig, base, grid)
    check_writable_dir(out, "--out")
    earlier_results(out)  # raises if unreadable: it could not be merged
    keys = list(grid)
    settings = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    configs = []
    for s in settings:  # build and check every config first: nothing runs if one is invalid
        try:
            cfg = TrainConfig(**{**base, **s, "output_dir": str(out / "runs" / _setting_name(s))})
        except (TypeError, ValueError) as e:
            raise CompareError(f"setting {s}: {e}") from None
        _check_run_dir(cfg, s)
        try:
            train.preflight(cfg)
        except train.TrainError as e:
            raise CompareError(f"setting {s}: {e}") from None
        configs.append(cfg)
    return settings, configs, keys, base


def _check_run_dir(cfg, setting: dict) -> None:
    from train.outputs import describe, run_entries

    entries = run_entries(Path(cfg.output_dir))
    if entries and not cfg.overwrite_output_dir:
        raise CompareError(f"setting {setting}: its run folder {cfg.output_dir} holds an earlier run "
                           f"({describe(entries)}); use another --out, or --set overwrite_output_dir=true "
                           f"to replace the earlier runs (each is kept if its new run fails)")


def run_setting(train, setting: dict, cfg) -> dict:
    """Train one setting; its row (metrics, seconds, output_dir, and `error`: '' when it finished).
    A failed run is a result of the sweep, not the end of it; Ctrl-C is (KeyboardInterrupt)."""
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
    """Merge this sweep's rows into out/results.* and write results.csv, results.json, results.png
    (each to a temporary name, then renamed). Returns the merged rows.

    Rows are matched by run folder (output_dir): a new row replaces the earlier one unless the new
    run failed and the earlier one had not (the earlier run's folder is still there, untouched);
    earlier rows of other settings are kept. JSON rows also carry each run's full config.
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
    cols = all_keys + METRICS + ["seconds", "error", "output_dir"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in merged:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.csv", buf.getvalue())
    write_json(out / "results.json", {"grid_keys": all_keys, "base_config": jsonable(dict(base)), "rows": merged})
    plot_sweep(merged, all_keys, out / "results.png")
    return merged


_ROW_FIELDS = set(METRICS) | {"seconds", "error", "output_dir", "config"}


def format_rows(rows: list[dict]) -> str:
    """Aligned table of a sweep's rows (settings first, then the metrics)."""
    if not rows:
        return "(no runs)"
    metric_cols = ["eval_loss_before", "eval_loss", "train_loss", "step_time_s", "tokens_per_s",
                   "tag_exact_match", "seconds", "error"]
    keys = [k for k in rows[0] if k not in metric_cols + ["output_dir"]]
    headers = keys + ["eval loss before", "eval loss", "train loss", "step ms", "tokens/s", "wall s", "error"]
    body = []
    for r in rows:
        st = r.get("step_time_s")
        body.append([r[k] for k in keys] + [r.get("eval_loss_before"), r.get("eval_loss"), r.get("train_loss"),
                                            None if st is None else st * 1e3, r.get("tokens_per_s"),
                                            r.get("seconds"), r.get("error") or ""])
    return table(headers, body)
