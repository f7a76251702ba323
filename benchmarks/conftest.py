"""Benchmark session set-up: Triton's interpreter on CPU machines, and the summary table.

TRITON_INTERPRET must be set before triton is imported (the @triton.jit decorators read it), so it
is set here, at conftest import, when there is no CUDA device. The repository root goes on
sys.path so `kernels` imports without an install (the GPU machine runs from a bare checkout).
"""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # the only way Triton runs on a CPU machine
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_table  # noqa: E402


def _meta() -> dict:
    import subprocess

    import triton

    commit = os.environ.get("LORAFUSE_COMMIT", "")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        commit += " (+ uncommitted changes)" if dirty else ""
    except OSError:
        pass
    commit = commit or "unknown (set LORAFUSE_COMMIT)"
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke)",
            "torch": torch.__version__, "triton": triton.__version__, "commit": commit}
    for mod in ("bitsandbytes", "peft"):
        try:
            meta[mod] = __import__(mod).__version__
        except ImportError:
            meta[mod] = "missing"
    import datetime

    meta["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return meta


def pytest_terminal_summary(terminalreporter):
    if not bench_table.RESULTS:
        return
    meta = _meta()
    terminalreporter.write_sep("=", "lorafuse LoRA layer benchmark")
    for k, v in meta.items():
        terminalreporter.write_line(f"{k}: {v}")
    if not torch.cuda.is_available():
        terminalreporter.write_line("CPU smoke rows: ours-triton runs through Triton's interpreter; "
                                    "these times prove the suite runs, they measure nothing.")
    terminalreporter.write_line(bench_table.table(bench_table.RESULTS))
    terminalreporter.write_line("triton/floor: our time over the bare dense bf16 GEMM(s); peft-*/triton: "
                                "speed-up over peft+bnb with fp32 (peft's default) / bf16 adapters; bnb/triton: "
                                "over bitsandbytes' own small-M path + an unfused LoRA term; % HBM: packed-W "
                                "bytes / time vs peak; triton strategy: what the cost model picked "
                                "(kernels/triton/strategy.py); checks: every provider against the fp32 spec.")
    bench_table.write(bench_table.RESULTS, meta)
