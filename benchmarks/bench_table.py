"""Collects benchmark rows and prints/writes the one comparison table (ratios to the floor and to peft)."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

RESULTS: list[dict] = []  # one dict per timed row, appended by test_bench_lora.py

# HBM bandwidth (GB/s) by device name, for the decode rows' "% of peak" column.
HBM_GBPS = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900,
            "H200": 4800, "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100-PCIE": 1555}
COLUMNS = ("ours-triton", "ours-torch", "peft-fp32", "peft-bf16", "bnb-gemm4bit", "floor", "dense-lora-unfused")


def hbm_gbps(device_name: str):
    for key, bw in HBM_GBPS.items():
        if key in device_name:
            return bw
    return None


def _ratio(a, b):
    return a / b if a and b else None


def table(results: list[dict]) -> str:
    """Markdown: one line per (shape, M, pass): ms per provider, ratios, throughput, peak memory,
    the strategy ours-triton ran, and every provider's output check."""
    rows = defaultdict(dict)
    for r in results:
        rows[(r["K"], r["N"], r["M"], r["mode"])][r["provider"]] = r
    head = ("| K | N | M | pass | " + " | ".join(f"{p} ms" for p in COLUMNS) + " | triton/floor | peft-fp32/triton | "
            "peft-bf16/triton | bnb/triton | triton TFLOP/s | triton GB/s (W) | % HBM | peak MiB triton / peft-fp32 | "
            "triton strategy | checks |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for (K, N, M, mode), by in sorted(rows.items()):
        # CUDA-graph times (M <= 16 rows) only when every provider has one, so a row compares like
        # with like; otherwise do_bench's plain median (includes Python launch overhead).
        graph = all("ms_graph" in r for r in by.values())
        key = "ms_graph" if graph else "ms"
        t = {p: by[p].get(key) if p in by else None for p in COLUMNS}
        f = lambda v, fmt="{:.3f}": "-" if v is None else fmt.format(v)  # noqa: E731
        tri = by.get("ours-triton", {})
        mem = f(tri.get("peak_mib"), "{:.0f}") + " / " + f(by.get("peft-fp32", {}).get("peak_mib"), "{:.0f}")
        host_bound = M <= 16 and not graph and any("peak_mib" in r for r in by.values())  # GPU rows
        label = mode + (" (graph)" if graph else " (host-bound: no graph)" if host_bound else "")
        checks = [p for p, r in by.items() if r.get("check", "ok") != "ok"]
        out.append(f"| {K} | {N} | {M} | {label} | " + " | ".join(f(t[p]) for p in COLUMNS) + " | "
                   f"{f(_ratio(t['ours-triton'], t['floor']), '{:.2f}x')} | "
                   f"{f(_ratio(t['peft-fp32'], t['ours-triton']), '{:.2f}x')} | "
                   f"{f(_ratio(t['peft-bf16'], t['ours-triton']), '{:.2f}x')} | "
                   f"{f(_ratio(t['bnb-gemm4bit'], t['ours-triton']), '{:.2f}x')} | "
                   f"{f(tri.get('tflops'), '{:.0f}')} | {f(tri.get('gbps'), '{:.0f}')} | "
                   f"{f(tri.get('hbm_pct'), '{:.0f}%')} | {mem} | {tri.get('strategy', '-')} | "
                   f"{'ok' if not checks else 'FAIL: ' + ', '.join(checks)} |")
    return "\n".join(out)


def write(results: list[dict], meta: dict) -> None:
    """Print nothing; write results.json and table.md under $LORAFUSE_BENCH_OUT when it is set."""
    out = os.environ.get("LORAFUSE_BENCH_OUT")
    if not out or not results:
        return
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "results.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    tmp.rename(d / "results.json")
    md = "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n" + table(results) + "\n"
    tmp = d / "table.md.tmp"
    tmp.write_text(md)
    tmp.rename(d / "table.md")
