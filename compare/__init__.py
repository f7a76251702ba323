"""compare: lorafuse against peft, numerically and in speed, and an ablation runner over train.

    python -m compare equivalence --quantization nf4      # row by row vs peft, exit 1 on any FAIL
    python -m compare speed --steps 20                    # ours vs peft, interleaved, with ratios
    python -m compare sweep --grid r=4,8 --grid quantization=none,nf4 --out sweep_out
    python -m compare sweep --grid r=4,16 --seeds 3 --jobs 2 --analyze-against seed=42 --out sw
    python -m compare analyze runs/a/adapter --against runs/b/adapter --base builtin:tiny-llama

From Python:
    from compare import sweep, analyze, run_equivalence, run_speed, ModelSpec
    rows = sweep({"max_steps": 20}, {"r": [4, 8], "quantization": ["none", "nf4"]}, out_dir="sweep_out")
    rows = sweep({"max_steps": 20}, {"r": [4, 16]}, out_dir="sw", seeds=3, analyze_against="seed=42")
    result = analyze("runs/a/adapter", against="runs/b/adapter", out_dir="analysis_out")

Nothing here runs at import, and the heavy imports (transformers, peft, train) wait for first use.
The sweep runner lives in `compare/ablation.py` (with sweep_stats, sweep_jobs and sweep_analysis
beside it): a module named `sweep` would replace the function `compare.sweep` as soon as it was
imported. `compare/analyze.py` is imported here eagerly for that
reason (it imports only torch at the top): the function `analyze` is bound after the module, so
`compare.analyze` stays the function even when `compare.analyze`'s helpers are imported.
"""
from __future__ import annotations

from .analyze import analyze
from .models import CompareError, ModelSpec

__all__ = ["sweep", "run_equivalence", "run_speed", "analyze", "ModelSpec", "CompareError"]


def __getattr__(name):
    # Lazy: `import compare` stays cheap and never imports triton before TRITON_INTERPRET is set.
    if name == "sweep":
        from .ablation import sweep
        return sweep
    if name == "run_equivalence":
        from .equivalence import run_equivalence
        return run_equivalence
    if name == "run_speed":
        from .speed import run_speed
        return run_speed
    raise AttributeError(f"module 'compare' has no attribute {name!r}")
