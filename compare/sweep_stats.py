"""A sweep's summary: its runs grouped by setting, with mean, sample std and n per metric.

    groups, group_keys = summarise(rows, grid_keys)

A setting is a run's full config without its seed (and without the fields that only say where
outputs go: ablation.OUTPUT_ONLY), so the runs of one setting differ only in their seed, and rows
that an earlier sweep with another base config merged into results.json form groups of their own.
Each group is labelled by the grid keys except seed, plus any config field whose value differs
between the merged rows' configs (e.g. a learning_rate that only the base configs of two sweeps
set apart), so two groups never carry the same label.

Per metric of STATS_METRICS (those the rows have), over the group's finished runs (error empty)
whose value is a finite number: `<metric>_mean`, `<metric>_std` (the sample standard deviation,
ddof=1: n-1 in the denominator; None for n < 2) and `<metric>_n`. `runs`, `failed` and `seeds`
say what the group holds.
"""
from __future__ import annotations

import json
import math
import statistics
from typing import Any, Mapping, Optional, Sequence

# The metrics a summary aggregates: the row's (ablation.METRICS, without eval_loss_before) and the
# analysis columns (sweep_analysis), where present.
STATS_METRICS = ["eval_loss", "train_loss", "step_time_s", "tokens_per_s", "tag_exact_match",
                 "effective_rank", "phi_11", "phi_diag"]


def summarise(rows: Sequence[Mapping], keys: Sequence[str]) -> tuple[list[dict], list[str]]:
    """(groups, group keys): one dict per setting, in the order its first run appears in `rows`."""
    varying = _varying_fields(rows)
    group_keys = [k for k in keys if k != "seed"] + [k for k in varying if k not in keys]
    groups: dict[str, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(_setting_of(r, keys), []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        label = {k: _value(first, k) for k in group_keys}
        ok = [r for r in members if not r.get("error")]
        g = {**label, "runs": len(members), "failed": len(members) - len(ok),
             "seeds": [_value(r, "seed") for r in members]}
        for m in STATS_METRICS:
            if not any(m in r for r in members):
                continue
            vals = [float(r[m]) for r in ok if _finite(r.get(m))]
            g.update(mean_std_n(vals, m))
        g["output_dirs"] = [r.get("output_dir") for r in members]
        out.append(g)
    return out, group_keys


def mean_std_n(values: Sequence[float], name: str) -> dict:
    """{name_mean, name_std, name_n}: the mean, the sample std (ddof=1; None for n < 2) and n."""
    n = len(values)
    return {f"{name}_mean": statistics.fmean(values) if n else None,
            f"{name}_std": statistics.stdev(values) if n >= 2 else None,
            f"{name}_n": n}


def _config(r: Mapping) -> Optional[dict]:
    from .ablation import OUTPUT_ONLY

    cfg = r.get("config")
    return {k: v for k, v in cfg.items() if k not in OUTPUT_ONLY} if isinstance(cfg, dict) else None


def _setting_of(r: Mapping, keys: Sequence[str]) -> str:
    """The group of row `r`: its config without seed, or (a row without config) its grid values."""
    cfg = _config(r)
    if cfg is None:
        cfg = {k: r.get(k) for k in keys if k != "seed"}
    return json.dumps({k: v for k, v in cfg.items() if k != "seed"}, sort_keys=True, default=str)


def _varying_fields(rows: Sequence[Mapping]) -> list[str]:
    """Config fields (except seed) that do not have one value across the rows' configs."""
    configs = [c for c in map(_config, rows) if c is not None]
    names = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in names if k != "seed"
            and len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


def _value(r: Mapping, k: str) -> Any:
    """A label value: the row's own column, else its config's field."""
    if k in r:
        return r[k]
    cfg = r.get("config")
    return cfg.get(k) if isinstance(cfg, dict) else None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def format_summary(groups: Sequence[Mapping], group_keys: Sequence[str]) -> str:
    """Aligned table: one line per setting, `mean +- std (n)` for the main metrics."""
    from .report import table

    def cell(g, m, scale=1.0, digits=4):
        mean, std, n = g.get(f"{m}_mean"), g.get(f"{m}_std"), g.get(f"{m}_n", 0)
        if mean is None:
            return ""
        spread = "" if std is None else f" +- {std * scale:.2g}"
        return f"{mean * scale:.{digits}g}{spread} ({n})"

    cols = [("eval loss", "eval_loss", 1.0), ("train loss", "train_loss", 1.0), ("step ms", "step_time_s", 1e3),
            ("tokens/s", "tokens_per_s", 1.0), ("tag exact", "tag_exact_match", 1.0),
            ("eff. rank", "effective_rank", 1.0), ("phi diag", "phi_diag", 1.0)]
    cols = [c for c in cols if any(g.get(f"{c[1]}_mean") is not None for g in groups)]
    body = [[g.get(k) for k in group_keys] + [g["runs"], g["failed"]] + [cell(g, m, s) for _, m, s in cols]
            for g in groups]
    return (table(list(group_keys) + ["runs", "failed"] + [h for h, _, _ in cols], body)
            + "\neach cell: mean +- sample std (ddof=1) over the setting's finished runs (n)")
