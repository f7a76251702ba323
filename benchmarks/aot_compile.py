"""Compile every kernel the triton backend can launch for an H100 (sm_90) WITHOUT a GPU: the static proof.

Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin through the bundled ptxas) for the
kernels a representative layer launches (Llama-7B-like K = 4096, N = 11008; M = 1, 32, 64 for the
gemv's 16 / 32 / 64-row tiles, M = 4096 for the large-M strategies; every format and rank asked),
each strategy forced in turn. The calls run through the real launchers on meta tensors
(kernels/triton/aot.py), so every kernel gets the JIT's own specialisation (16-byte-aligned
pointers and ints divisible by 16 carry the divisibility attribute, unit strides are constexprs,
the split-K an H100's 132 SMs get). One record per kernel config:

    op, path, kernel, fmt, r, config, registers, spill_bytes (STACK + LOCAL), smem_bytes,
    sass_per_weight_element (biggest SASS loop / weight elements one thread decodes per trip;
    null for kernels that never read W), loop_instructions, elems_per_thread, shipped, failures

shipped: `auto` can pick it (the gemv and dequant-mm strategies' kernels; "fused" is for study,
kernels/triton/strategy.AUTO). Targets for shipped records: no spill, <= 227 KiB of shared memory,
gemv <= 8 instructions per weight element, dequantize <= 20, and at most the figure the cost model
uses (strategy.SASS_PER_ELEMENT, +10%); at r = 16, 64 and 128 every format asked has shipped
forward and backward kernels. The fused kernels' records also check the autotuner's shared-memory
table (kernels/triton/smem_sm90.json; --write-table rewrites it). Exit 1 when a target fails or a
config does not compile; bad flags: an `error:` line, exit 2, before any compile.

    .venv/bin/python benchmarks/aot_compile.py --json aot.json            # everything (~1 h on 2 cores)
    .venv/bin/python benchmarks/aot_compile.py --quick                    # shipped kernels, nf4, r = 16
    .venv/bin/python benchmarks/aot_compile.py --path fused --write-table --r 16 64 128
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

FMTS = ("nf4-nested", "nf4-fp32absmax", "int8", "dense")
RANKS = (8, 16, 64, 128)  # padded to R = 16, 16, 64, 128
PATHS = ("gemv", "dequant-mm", "fused")
K, N, M_LARGE = 4096, 11008, 4096
GEMV_MS = (1, 32, 64)  # one M per row-tile height
H100_SMS = 132
TARGET_GEMV, TARGET_DEQUANT, MODEL_SLACK = 8.0, 20.0, 1.1
COVERED_RANKS = (16, 64, 128)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="shipped kernels only, for nf4-nested at r = 16 unless --fmt / --r say otherwise")
    p.add_argument("--fmt", nargs="+", choices=FMTS, default=None, help="weight formats (default: all)")
    p.add_argument("--r", nargs="+", type=int, choices=RANKS, default=None, help="LoRA ranks (default: all)")
    p.add_argument("--path", nargs="+", choices=PATHS, default=list(PATHS), help="strategies (default: all)")
    p.add_argument("--json", metavar="PATH", help="write the records (and the summary table) here")
    p.add_argument("--write-table", action="store_true",
                   help="merge the fused kernels' shared memory per config (max over formats and variants) "
                        "into kernels/triton/smem_sm90.json, the autotuner's pruning table")
    args = p.parse_args(argv)
    args.fmt = args.fmt or (["nf4-nested"] if args.quick else list(FMTS))
    args.r = args.r or ([16] if args.quick else list(RANKS))
    if args.json and os.path.isdir(args.json):
        p.error(f"--json {args.json}: is a directory; give a file name")
    return args


def _weight(fmt: str, torch, formats):
    meta = dict(device="meta")
    if fmt == "dense":
        return formats.DenseWeight(torch.empty(N, K, dtype=torch.bfloat16, **meta))
    if fmt == "int8":
        return formats.Int8Weight(CB=torch.empty(N, K, dtype=torch.int8, **meta),
                                  SCB=torch.empty(N, dtype=torch.float32, **meta))
    nb = N * K // 64
    nested = None
    if fmt == "nf4-nested":
        nested = formats.NestedAbsmax(code=torch.empty(256, **meta), absmax=torch.empty(-(-nb // 256), **meta),
                                      blocksize=256, offset=0.0)
    return formats.Quant4bitWeight(
        packed=torch.empty(N * K // 2, 1, dtype=torch.uint8, **meta),
        absmax=torch.empty(nb, dtype=torch.uint8 if nested else torch.float32, **meta),
        code=torch.empty(16, **meta), blocksize=64, shape=(N, K), quant_type="nf4", dtype=torch.bfloat16,
        nested=nested)


def launches(fmt: str, r: int, paths: list[str], quick: bool) -> list[tuple]:
    """(op, path, label, aot.Launch, shipped) for the representative calls of one format and rank."""
    import torch

    from kernels import formats
    from kernels.call import make_call
    from kernels.triton import aot, decode, launch

    w = _weight(fmt, torch, formats)
    A = torch.empty(r, K, device="meta")
    B = torch.empty(N, r, device="meta")
    seed = torch.empty(1, dtype=torch.int64, device="meta")

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    def forced(strategy, fn):
        os.environ["LORAFUSE_STRATEGY"] = strategy
        try:
            return aot.capture(fn)
        finally:
            del os.environ["LORAFUSE_STRATEGY"]

    def fwd(m, p):
        return lambda: launch.forward(make_call(meta(m, K), w, None, A, B, 2.0, p, True, None, None),
                                      seed if p else None)

    def bwd(p, needs_dx):
        return lambda: launch.backward(meta(M_LARGE, N), meta(M_LARGE, K), meta(M_LARGE, r, dtype=torch.float32), w,
                                       A, B, 2.0, p, seed if p else None, needs_dx)

    out = []
    if "gemv" in paths:
        for m in GEMV_MS:
            (gemv,) = forced("gemv", fwd(m, 0.0))
            out.append(("forward", "gemv", f"gemv-M{m}", gemv, True))
        if not quick:
            for cfg in decode.STUDY_CONFIGS:
                (study,) = aot.capture(lambda: decode.gemv_forward(meta(cfg.BLOCK_M, K), w, None, A, B, 2.0, 0.0,
                                                                   None, config=cfg))
                out.append(("forward", "gemv", f"gemv-M{cfg.BLOCK_M}-study", study, False))
    if "dequant-mm" in paths:
        for p in (0.1,) if quick else (0.0, 0.1):
            for launched in forced("dequant-mm", fwd(M_LARGE, p)):
                out.append(("forward", "dequant-mm", _label(launched, p), launched, True))
        for p, needs_dx in ((0.1, True),) if quick else ((0.0, True), (0.1, True), (0.1, False)):
            for launched in forced("dequant-mm", bwd(p, needs_dx)):
                label = _label(launched, p) + ("" if needs_dx else "-nodx")
                out.append(("backward", "dequant-mm", label, launched, True))
    if "fused" in paths and not quick:
        plain, (down, u_in) = forced("fused", fwd(M_LARGE, 0.0)), forced("fused", fwd(M_LARGE, 0.1))
        out += [("forward", "fused", "fwd", plain[0], False), ("forward", "fused", "fwd-u_in", u_in, False),
                ("forward", "fused", "down-drop", down, False)]
        out += [("backward", "fused", "bwd", forced("fused", bwd(0.1, True))[0], False),
                ("backward", "fused", "bwd-nodx", forced("fused", bwd(0.1, False))[0], False)]
    return out


def _label(launched, p: float) -> str:
    short = launched.name.replace("_kernel", "").replace("lora_", "")
    return short + ("-drop" if p and short in ("down", "grad_in") else "")


def elems_per_thread(launched, cfg) -> float | None:
    """Weight elements one thread decodes per trip of the kernel's main loop (None: never reads W)."""
    kw = {**launched.kwargs, **cfg.kwargs}
    warps = cfg.num_warps or kw.get("num_warps", 4)
    threads = 32 * warps
    name = launched.name
    if name in ("lora_gemv_kernel", "dequantize_kernel", "lora_forward_kernel"):
        return kw["BLOCK_N"] * kw["BLOCK_K"] / threads
    if name == "lora_backward_kernel":
        return kw["BLOCK_N"] * kw["BLOCK_K"] / threads if kw.get("COMPUTE_DX") else None
    if name == "dequant_4bit_kernel":
        return 2 * kw["ROWS"] * kw["COLS"] / threads
    return None


def model_key(launched, fmt_code: int):
    """The strategy model's SASS_PER_ELEMENT key this kernel's figure stands for (None: none)."""
    name = launched.name
    kernel = {"lora_gemv_kernel": "gemv", "dequant_4bit_kernel": "dequant", "dequantize_kernel": "dequant",
              "lora_forward_kernel": "fused-forward", "lora_backward_kernel": "fused-backward"}.get(name)
    if kernel == "gemv":
        return kernel, fmt_code, launched.kwargs["BLOCK_M"]
    return None if kernel is None else (kernel, fmt_code)


def config_text(launched, cfg) -> str:
    kw = {**{k: v for k, v in launched.kwargs.items() if k.startswith("BLOCK_") or k in ("ROWS", "COLS", "SPLIT_K")},
          **{k: v for k, v in cfg.kwargs.items() if k.startswith("BLOCK_")}}
    tiles = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "ROWS", "COLS") if k in kw)
    split = f"-split{kw['SPLIT_K']}" if kw.get("SPLIT_K", 1) > 1 else ""
    warps = cfg.num_warps or launched.kwargs.get("num_warps", 4)
    stages = cfg.num_stages or launched.kwargs.get("num_stages", 3)
    return f"{tiles}-w{warps}-s{stages}{split}"


def measure(launched, cfg) -> dict:
    from kernels.triton import aot

    compiled = aot.compile(launched, cfg)
    res = aot.resources(compiled)
    loops = aot.sass_loops(compiled)
    elems = elems_per_thread(launched, cfg)
    count = loops[0][0] if loops else aot.sass_count(compiled)
    return {"registers": res.get("REG"), "spill_bytes": res.get("STACK", 0) + res.get("LOCAL", 0),
            "smem_bytes": compiled.metadata.shared, "loop_instructions": count if loops else None,
            "kernel_instructions": None if loops else count, "elems_per_thread": elems,
            "sass_per_weight_element": None if elems is None else round(count / elems, 2)}


def check(rec: dict, fmt_code: int, launched, kept: list, cfg, fused_table) -> list[str]:
    """The targets this record misses (module doc)."""
    from kernels.triton import configs, strategy

    bad = []
    smem, per = rec["smem_bytes"], rec["sass_per_weight_element"]
    if rec["shipped"]:
        if rec["spill_bytes"]:
            bad.append(f"spills {rec['spill_bytes']} B/thread")
        if smem > configs.H100_SMEM:
            bad.append(f"{smem} B of shared memory > the H100's {configs.H100_SMEM}")
        key = model_key(launched, fmt_code)
        target = {"gemv": TARGET_GEMV, "dequant": TARGET_DEQUANT}.get((key or ("",))[0])
        if per is not None and target is not None and per > target:
            bad.append(f"{per} instructions per weight element > the target {target}")
        if per is not None and key is not None and per > MODEL_SLACK * strategy.SASS_PER_ELEMENT[key]:
            bad.append(f"{per} instructions per weight element > the cost model's {strategy.SASS_PER_ELEMENT[key]} "
                       f"(+10%): update kernels/triton/strategy.SASS_PER_ELEMENT{key}")
    if fused_table is not None:  # the fused kernels' autotune table (configs.smem_bytes)
        kernel, R = fused_table
        try:
            bound = configs.smem_bytes(kernel, cfg, R)
        except (KeyError, FileNotFoundError):
            bound = None
        if bound is None or smem > bound:
            bad.append(f"smem {smem} > the pruner's table entry {bound}: rewrite it (--write-table)")
        if cfg in kept and smem > configs.H100_SMEM:
            bad.append(f"kept by the pruner but {smem} B > the H100's {configs.H100_SMEM}")
    return bad


def summary(records: list[dict]) -> str:
    """Markdown: one row per (path, op, kernel label, config), ranges over the formats and ranks."""
    rows = defaultdict(list)
    for rec in records:
        if "error" not in rec:
            rows[(rec["path"], rec["op"], rec["label"], rec["config"], rec["shipped"])].append(rec)
    out = ["| path | op | kernel | config | shipped | r | registers | spill B | smem KiB | SASS / weight elem | ok |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]

    def span(vals, fmt="{}"):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        lo, hi = min(vals), max(vals)
        return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"

    for (path, op, label, config, shipped), recs in sorted(rows.items(), key=lambda t: (PATHS.index(t[0][0]), t[0][1:])):
        out.append(f"| {path} | {op} | {label} | {config} | {'yes' if shipped else 'no'} | "
                   f"{span([r['r'] for r in recs])} | {span([r['registers'] for r in recs])} | "
                   f"{span([r['spill_bytes'] for r in recs])} | {span([r['smem_bytes'] / 1024 for r in recs], '{:.0f}')} | "
                   f"{span([r['sass_per_weight_element'] for r in recs], '{:.1f}')} | "
                   f"{'yes' if all(not r['failures'] for r in recs) else 'NO'} |")
    return "\n".join(out)


def coverage(records: list[dict], fmts: list[str], ranks: list[int], paths: list[str]) -> list[str]:
    """At r = 16, 64, 128: shipped forward and backward kernels for every format, all within target."""
    missing = []
    for fmt in fmts:
        for r in [r for r in COVERED_RANKS if r in ranks]:
            mine = [x for x in records if x["fmt"] == fmt and x["r"] == r and x["shipped"]]
            for op, path in (("forward", "gemv"), ("forward", "dequant-mm"), ("backward", "dequant-mm")):
                if path not in paths:
                    continue
                got = [x for x in mine if x["op"] == op and x["path"] == path]
                if not got or any(x.get("failures") or "error" in x for x in got):
                    missing.append(f"{fmt} r={r}: no {op} {path} kernel set within its targets")
    return missing


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the interpreter cannot compile
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kernels import formats
    from kernels.triton import configs, decode, launch

    launch.smem_limit = lambda device=None: configs.H100_SMEM  # the pruner's view: an H100
    decode.sm_count = lambda device: H100_SMS  # the split-K an H100 gets
    fmt_codes = {"nf4-nested": formats.FMT_4BIT, "nf4-fp32absmax": formats.FMT_4BIT, "int8": formats.FMT_INT8,
                 "dense": formats.FMT_DENSE}
    measured: dict = {}  # fused kernel -> config id -> R -> max bytes over formats and variants
    records = []
    for fmt in args.fmt:
        for r in args.r:
            R = configs.rank_block(r)
            for op, path, label, launched, shipped in launches(fmt, r, args.path, args.quick):
                fused = launched.name in ("lora_forward_kernel", "lora_backward_kernel")
                try:
                    kept = launched.kept()
                except (RuntimeError, KeyError, FileNotFoundError):  # nothing fits, or no table yet
                    kept = []
                for cfg in launched.configs():
                    t = time.time()
                    rec = {"op": op, "path": path, "label": label, "kernel": launched.name, "fmt": fmt, "r": r,
                           "config": config_text(launched, cfg), "shipped": shipped}
                    try:
                        rec.update(measure(launched, cfg))
                    except Exception as e:  # report every failing variant, then fail
                        msg = str(e).strip().splitlines()
                        rec["error"] = f"{type(e).__name__}: {msg[-1] if msg else ''}"
                        rec["failures"] = ["does not compile"]
                        records.append(rec)
                        print(f"FAIL {label:16s} {fmt:14s} r={r:<3d} {rec['config']}: {rec['error']}", flush=True)
                        continue
                    kind = "forward" if launched.name == "lora_forward_kernel" else "backward"
                    if fused:
                        per_r = measured.setdefault(kind, {}).setdefault(configs.config_id(cfg), {})
                        per_r[str(R)] = max(per_r.get(str(R), 0), rec["smem_bytes"])
                    table = (kind, R) if fused and not args.write_table else None
                    rec["failures"] = check(rec, fmt_codes[fmt], launched, kept, cfg, table)
                    records.append(rec)
                    per = rec["sass_per_weight_element"]
                    print(f"{'FAIL' if rec['failures'] else 'ok  '} {label:16s} {fmt:14s} r={r:<3d} {rec['config']:24s} "
                          f"{'shipped' if shipped else 'study  '} regs={rec['registers']} spill={rec['spill_bytes']} "
                          f"smem={rec['smem_bytes']} sass/elem={per if per is not None else '-'} "
                          f"({time.time() - t:.1f}s)" + "".join(f"  <- {f}" for f in rec["failures"]), flush=True)
    missing = coverage(records, args.fmt, args.r, args.path)
    failed = [x for x in records if x["failures"]]
    table = summary(records)
    print("\n" + table)
    for m in missing:
        print("FAIL coverage:", m)
    print(f"{len(records) - len(failed)}/{len(records)} kernel configs compiled for sm_90 within their targets"
          + (f"; {len(missing)} coverage gaps" if missing else ""))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"target": "sm_90 (H100), K=4096 N=11008", "records": records, "coverage_gaps": missing,
                       "summary": table}, f, indent=1)
        os.replace(tmp, args.json)  # written whole or not at all
        print(f"wrote {args.json}")
    if args.write_table:
        path = configs.SMEM_TABLE
        old = json.loads(path.read_text()) if path.exists() else {}
        for kernel, per_cfg in measured.items():
            for cid, per_r in per_cfg.items():
                entry = old.setdefault(kernel, {}).setdefault(cid, {})
                for R, b in per_r.items():
                    entry[R] = max(entry.get(R, 0), b)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
        print(f"wrote {path}")
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
