"""`compare.analyze` on every finished run of a sweep, against a reference run.

    compare.sweep(base, {"r": [4, 16]}, seeds=3, analyze_against="seed=42")     # the seed-42 run of each r
    compare.sweep(base, {"r": [4, 16]}, seeds=3, analyze_against="r=16,seed=43")  # one run for all
    compare.sweep(base, {"r": [4, 16]}, analyze_against="runs/other/adapter")  # a folder from elsewhere

The reference of a run is its own setting with the given grid values replaced (so `seed=42` is
"the same setting with seed 42"), or one adapter folder for every run. Each run's analysis is
written to <run folder>/analysis/<reference run folder name>/ (analysis.json and the PNGs of
compare.analyze; "self" for the reference run itself, which is analysed alone), so analyses against
several references live side by side. The columns it adds to the run's row (ANALYSIS_COLUMNS):

  analysis_against  the reference adapter's folder ('' for the reference run itself)
  effective_rank    mean over layers of delta W's effective rank (compare.analyze)
  phi_11            mean over layers of phi(1, 1) against the reference: do the top directions agree
  phi_diag          mean over layers of the mean of phi(i, i), i = 1..min(r1, r2)
  phi_random        what phi_diag is for unrelated random subspaces: the mean of i / K over the
                    same i, K = the layers' input width (Hu et al. 2021: E phi(i, j) = max(i, j)/K)
  analysis_error    '' or why the run could not be analysed (the reference run failed, ...)

phi is over the right singular vectors of the A matrices by default (`subspace`, as in analyze).
Every reference is resolved before the first run: a setting that is not a run of the sweep, or a
folder that is not a LoRA adapter, raises CompareError.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

from .analyze import SUBSPACES, analyze, read_adapter
from .models import CompareError

Reference = Union[int, Path]  # the index of the reference run in the sweep's runs, or an adapter folder


def check_subspace(subspace: str) -> None:
    if subspace not in SUBSPACES:
        raise CompareError(f"unknown analysis subspace {subspace!r}; valid: {', '.join(SUBSPACES)}")


def resolve_references(spec: Union[str, Path, Mapping], runs: list, keys: list[str],
                       say: Callable[[str], None] = lambda msg: None) -> list[Reference]:
    """Per run, its reference (see the module docstring). `spec`: grid values as a dict or as
    "KEY=VALUE[,KEY=VALUE]", or an adapter folder (a path that exists)."""
    from .ablation import _coerce, _fields, _train

    _, TrainConfig = _train()
    overrides = _parse(spec, keys)
    if overrides is None:
        folder = Path(spec).expanduser()
        read_adapter(folder)  # CompareError, one line, if it is not a LoRA adapter
        return [folder] * len(runs)
    fields = _fields(TrainConfig)
    values = {k: _coerce(fields[k], v) for k, v in overrides.items()}
    index = {tuple(r.setting[k] for k in keys): i for i, r in enumerate(runs)}
    refs = []
    for r in runs:
        target = {**r.setting, **values}
        i = index.get(tuple(target[k] for k in keys))
        if i is None:
            have = {k: sorted({run.setting[k] for run in runs}, key=str) for k in values}
            raise CompareError(f"--analyze-against {_show(spec)}: the reference of {r.setting} would be {target}, "
                               f"which is not a run of this sweep (its values: {have})")
        refs.append(i)
    if "seed" in keys and "seed" in values and str(runs[0].config.model).startswith("builtin:"):
        say("note: the built-in tiny model is built from each run's seed, so runs of different seeds "
            "also have different base models; to compare adapters on one base, save it once "
            "(train.models.save_builtin) and --set model=THAT_FOLDER")
    return refs


def _parse(spec, keys: list[str]) -> Optional[dict]:
    """The grid values `spec` names, or None when it is a folder. CompareError when it is neither."""
    if isinstance(spec, Mapping):
        unknown = [k for k in spec if k not in keys]
        if unknown or not spec:
            raise CompareError(f"analyze_against {dict(spec)}: give grid keys of this sweep ({', '.join(keys)}); "
                               f"{unknown} are not")
        return dict(spec)
    text = str(spec).strip()
    if not text:
        raise CompareError("--analyze-against is empty; give KEY=VALUE[,KEY=VALUE] or an adapter folder")
    parts = [p.partition("=") for p in text.split(",")]
    pairs = {k.strip().replace("-", "_"): v.strip() for k, sep, v in parts if sep}
    if len(pairs) == len(parts) and all(k in keys and v for k, v in pairs.items()):
        return pairs
    if Path(text).expanduser().exists():
        return None
    raise CompareError(f"--analyze-against {text}: write KEY=VALUE[,KEY=VALUE] with grid keys of this sweep "
                       f"({', '.join(keys)}), or give an adapter folder that exists")


def _show(spec) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.items()) if isinstance(spec, Mapping) else str(spec)


def analyse_runs(runs: list, rows: list[Optional[dict]], refs: list[Reference], subspace: str = "A",
                 say: Callable[[str], None] = lambda msg: None) -> None:
    """Analyse each finished run against its reference; add ANALYSIS_COLUMNS to its row in place."""
    for i, (run, row) in enumerate(zip(runs, rows)):
        if row is None or row.get("error"):
            continue
        ref = refs[i]
        against, name, problem = None, "self", ""
        if isinstance(ref, Path):
            against = ref
            name = f"{ref.resolve().name}-{hashlib.sha256(str(ref.resolve()).encode()).hexdigest()[:6]}"
        elif ref != i:
            name = Path(runs[ref].config.output_dir).name
            if rows[ref] is None or rows[ref].get("error"):
                problem = f"its reference run {runs[ref].setting} did not finish"
            else:
                against = Path(runs[ref].config.output_dir) / "adapter"
        folder = Path(run.config.output_dir) / "analysis" / name
        say(f"analysing {run.setting}" + (f" against {against}" if against is not None else ""))
        try:
            result = analyze(Path(run.config.output_dir) / "adapter", against=against, out_dir=folder,
                             subspace=subspace, overwrite=True)
        except CompareError as e:
            row.update({c: None for c in ("effective_rank", "phi_11", "phi_diag", "phi_random")},
                       analysis_against="" if against is None else str(against), analysis_error=str(e))
            continue
        row.update(columns(result), analysis_error=problem)


def columns(result: dict) -> dict:
    """The row's analysis columns from one `compare.analyze` result."""
    diag, first, random = [], [], []
    for s in result["layers"].values():
        phi = s.get("subspace_similarity")
        if not phi:
            continue
        k = min(len(phi), len(phi[0]))
        first.append(phi[0][0])
        diag.append(sum(phi[i][i] for i in range(k)) / k)
        random.append(sum((i + 1) / s["ambient_dim"] for i in range(k)) / k)
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    return {"analysis_against": result["against"] or "", "effective_rank": result["summary"]["mean_effective_rank"],
            "phi_11": mean(first), "phi_diag": mean(diag), "phi_random": mean(random)}
