"""Collects benchmark rows and prints/writes the one comparison table (ratios to floor and peft)."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

RESULTS: list[dict] = []  # one dict per timed row, appended by test_bench_lora.py

# HBM bandwidth (GB/s) by device name, for the decode rows' "% of peak" column.
HBM_GBPS = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900,
            "H200": 4800, "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100-PCIE": 1555}


def hbm_gbps(device_name: str):
    for key, bw in HBM_GBPS.items():
        if key in device_name:
            return bw
    return None


def table(results: list[dict]) -> str:
    """Markdown: one line per (shape, M, mode), ms per provider, ratios, throughput, peak memory."""
    rows = defaultdict(dict)
    for r in results:
        rows[(r["K"], r["N"], r["M"], r["mode"])][r["provider"]] = r
    head = ("| K | N | M | pass | triton ms | torch ms | peft ms | floor ms | triton/floor | "
            "peft/triton | triton TFLOP/s | triton GB/s (W) | % HBM | peak MiB triton / peft |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for (K, N, M, mode), by in sorted(rows.items()):
        # CUDA-graph times (decode rows) only when every provider has one, so a row compares like
        # with like; otherwise do_bench's plain median (includes Python launch overhead).
        graph = all("ms_graph" in r for r in by.values())
        key = "ms_graph" if graph else "ms"
        t = {p: by[p][key] if p in by else None for p in ("ours-triton", "ours-torch", "peft", "floor")}
        f = lambda v, fmt="{:.3f}": "-" if v is None else fmt.format(v)
        tri = by.get("ours-triton", {})
        ratio_floor = t["ours-triton"] / t["floor"] if t["ours-triton"] and t["floor"] else None
        ratio_peft = t["peft"] / t["ours-triton"] if t["ours-triton"] and t["peft"] else None
        mem = (f(tri.get("peak_mib"), "{:.0f}") + " / " + f(by.get("peft", {}).get("peak_mib"), "{:.0f}"))
        out.append(f"| {K} | {N} | {M} | {mode}{' (graph)' if graph else ''} | {f(t['ours-triton'])} | {f(t['ours-torch'])} | "
                   f"{f(t['peft'])} | {f(t['floor'])} | {f(ratio_floor, '{:.2f}x')} | "
                   f"{f(ratio_peft, '{:.2f}x')} | {f(tri.get('tflops'), '{:.0f}')} | "
                   f"{f(tri.get('gbps'), '{:.0f}')} | {f(tri.get('hbm_pct'), '{:.0f}%')} | {mem} |")
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
