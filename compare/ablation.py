"""Ablation sweeps: short trainings through `train.run` over a grid of TrainConfig fields.

    rows = compare.sweep({"max_steps": 20}, {"r": [4, 8], "quantization": ["none", "nf4"]},
                         out_dir="sweep_out")

writes sweep_out/results.csv, results.json and results.png (eval loss and step time per setting),
one training run per grid point under sweep_out/runs/<setting>/. Every grid key and value is checked
against TrainConfig (field names, types, choices) before the first run starts.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from .models import CompareError
from .plots import plot_sweep
from .report import jsonable, table, write_json, write_text

# Fields a sweep sets itself for each run (or that make no sense per grid point).
RESERVED = ("output_dir", "resume_from_checkpoint")
# Small defaults for a sweep when the caller gives no base config: short runs, no checkpoints,
# no generation samples, so a grid of tiny runs finishes in CI time.
SWEEP_DEFAULTS = {"max_steps": 20, "eval_steps": 0, "save_steps": 0, "logging_steps": 5,
                  "tag_eval_samples": 0, "num_sample_generations": 0, "report_to": "none"}


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
    """`value` (a string from the CLI, or a Python value) as the field's type; CompareError if not."""
    t = _type_name(f)
    choices = f.metadata.get("choices") if f.metadata else None
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
    except (TypeError, ValueError):
        raise CompareError(f"{f.name}={value!r}: expected a value of type {t}") from None
    if choices and out not in choices:
        raise CompareError(f"{f.name}={value!r} is not valid; valid values: {', '.join(map(str, choices))}")
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
    (empty when the run finished). Bad keys or values raise CompareError before any run.
    """
    train, TrainConfig = _train()
    say = progress or (lambda msg: None)
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(grid)
    settings = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    configs = []
    for s in settings:  # build every config first: TrainConfig's own checks fail before any run
        try:
            configs.append(TrainConfig(**{**base, **s, "output_dir": str(out / "runs" / _setting_name(s))}))
        except (TypeError, ValueError) as e:
            raise CompareError(f"setting {s}: {e}") from None

    rows = []
    for i, (s, cfg) in enumerate(zip(settings, configs)):
        say(f"run {i + 1}/{len(settings)}: {s}")
        t0 = time.perf_counter()
        row = {**s, "eval_loss": None, "eval_loss_before": None, "train_loss": None,
               "step_time_s": None, "tokens_per_s": None, "tag_exact_match": None}
        try:
            row.update(_summarise(train.run(cfg)))
            row["error"] = ""
        except Exception as e:  # a failed run is a result of the sweep, not the end of it
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        row["seconds"] = time.perf_counter() - t0
        row["output_dir"] = cfg.output_dir
        rows.append(row)
    write_results(rows, keys, base, out)
    return rows


def write_results(rows: list[dict], keys: list[str], base: Mapping[str, Any], out: Path) -> None:
    """results.csv, results.json and results.png in `out`, each written to a temp name then renamed."""
    cols = list(keys) + ["eval_loss", "eval_loss_before", "train_loss", "step_time_s", "tokens_per_s",
                         "tag_exact_match", "seconds", "error", "output_dir"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    write_text(out / "results.csv", buf.getvalue())
    write_json(out / "results.json", {"grid_keys": keys, "base_config": jsonable(dict(base)), "rows": rows})
    plot_sweep(rows, keys, out / "results.png")


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
