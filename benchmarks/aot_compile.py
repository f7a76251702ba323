"""Compile every fused kernel for an H100 (sm_90) WITHOUT a GPU and report its resources.

Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin through the bundled ptxas), for the
kernels a representative call launches (Llama-7B-like K = 4096, N = 11008; M = 4096 for the tiled
forward / backward, M = 8 for decode; every format; every rank asked), per autotune config.
The calls run through the real launchers on meta tensors (kernels/triton/aot.py), so each kernel
gets the JIT's own specialisation: 16-byte-aligned pointers and ints divisible by 16 carry the
divisibility attribute, unit strides are constexprs. Resource usage is read from the cubin with
cuobjdump: registers, spills (Triton's spills show under STACK, not LOCAL) and shared memory.

Fails (exit 1) when a config does not compile, when the compiler's shared memory exceeds the
figure in kernels/triton/smem_sm90.json (the pruner's input: rewrite it with --write-table after
changing a kernel), or when a config the pruner keeps does not fit the H100. Bad flags: an
`error:` line, exit 2, before any compile.

    .venv/bin/python benchmarks/aot_compile.py [--quick] [--fmt nf4-nested ...] [--r 16 ...] [--kernel forward ...]
    .venv/bin/python benchmarks/aot_compile.py --write-table --r 16 32 64 128 --kernel forward backward decode
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

FMTS = ("nf4-nested", "nf4-fp32absmax", "int8", "dense")
RANKS = (8, 16, 32, 64, 128)  # padded to R = 16, 16, 32, 64, 128
KERNELS = ("forward", "backward", "decode", "down")
K, N, M_TILED, M_DECODE = 4096, 11008, 4096, 8
TABLE = "smem_sm90.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the first two configs of each kernel")
    p.add_argument("--fmt", nargs="+", choices=FMTS, default=list(FMTS), help="weight formats (default: all)")
    p.add_argument("--r", nargs="+", type=int, choices=RANKS, default=list(RANKS), help="LoRA ranks (default: all)")
    p.add_argument("--kernel", nargs="+", choices=KERNELS, default=list(KERNELS),
                   help="which kernels (default: all; 'down' = the dropout down-projection)")
    p.add_argument("--config", nargs="+", type=int, default=None, metavar="I",
                   help="only the configs at these positions of each kernel's list (default: all)")
    p.add_argument("--write-table", action="store_true",
                   help=f"merge the shared memory measured for each config (the max over the formats and "
                        f"variants compiled, and over what the table held) into kernels/triton/{TABLE}, the "
                        "pruner's input (ranks 16, 64 and 128 give its entries; see configs.smem_bytes)")
    return p.parse_args(argv)


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


def launches(fmt: str, r: int, kernels: list[str]) -> list[tuple[str, object]]:
    """(label, aot.Launch) for the representative calls of one format and rank."""
    import torch

    from kernels import formats
    from kernels.call import make_call
    from kernels.triton import aot, launch

    w = _weight(fmt, torch, formats)
    A = torch.empty(r, K, device="meta")
    B = torch.empty(N, r, device="meta")
    seed = torch.empty(1, dtype=torch.int64, device="meta")

    def x(m):
        return torch.empty(m, K, dtype=torch.bfloat16, device="meta")

    def fwd(m, p):
        return aot.capture(lambda: launch.forward(make_call(x(m), w, None, A, B, 2.0, p, True, None, None),
                                                  seed if p else None))

    def bwd(needs_dx):
        g = torch.empty(M_TILED, N, dtype=torch.bfloat16, device="meta")
        u = torch.empty(M_TILED, r, device="meta")
        return aot.capture(lambda: launch.backward(g, x(M_TILED), u, w, A, B, 2.0, 0.1, seed, needs_dx))

    out = []
    if "forward" in kernels or "down" in kernels:
        plain, dropped = fwd(M_TILED, 0.0), fwd(M_TILED, 0.1)  # u in the K loop / u read (dropout)
        down, fused_u_in = dropped
        if "forward" in kernels:
            out += [("fwd", plain[0]), ("fwd-u_in", fused_u_in)]
        if "down" in kernels:
            out += [("down-M4096", down)]
    if "decode" in kernels or "down" in kernels:
        down16, gemv = fwd(M_DECODE, 0.1)
        out += [("gemv", gemv)] if "decode" in kernels else []
        out += [("down-M8", down16)] if "down" in kernels else []
    if "backward" in kernels:
        out += [("bwd", bwd(True)[0]), ("bwd-nodx", bwd(False)[0])]
    return out


def resources(cubin: bytes) -> dict:
    """{"REG": registers/thread, "STACK": spill bytes/thread, "LOCAL": ...} from cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the interpreter cannot compile
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kernels.triton import aot, configs, launch

    launch.smem_limit = lambda device=None: configs.H100_SMEM  # the pruner's view: an H100
    kind = {"fwd": "forward", "fwd-u_in": "forward", "bwd": "backward", "bwd-nodx": "backward", "gemv": "decode"}
    measured: dict = {}  # kernel -> config id -> R -> max bytes over formats and variants
    failures = total = 0
    for fmt in args.fmt:
        for r in args.r:
            R = configs.rank_block(r)
            for label, launched in launches(fmt, r, args.kernel):
                try:
                    kept = launched.kept()
                except (RuntimeError, KeyError, FileNotFoundError):  # nothing fits (the backend refuses
                    kept = []  # the call), or no table yet (--write-table makes it)
                cands = launched.configs()
                if args.config is not None:
                    cands = [c for i, c in enumerate(cands) if i in args.config]
                for cfg in cands[: 2 if args.quick else None]:
                    total += 1
                    t = time.time()
                    name = f"{label:9s} {fmt:14s} r={r:<3d} {str(cfg.kwargs):62s} w{cfg.num_warps} s{cfg.num_stages}"
                    try:
                        compiled = aot.compile(launched, cfg)
                    except Exception as e:  # report every failing variant, then fail
                        failures += 1
                        msg = str(e).strip().splitlines()
                        print(f"FAIL {name}: {type(e).__name__}: {msg[-1] if msg else ''}", flush=True)
                        continue
                    res, smem = resources(compiled.asm["cubin"]), compiled.metadata.shared
                    notes, bound = [], None
                    if label in kind:
                        per_r = measured.setdefault(kind[label], {}).setdefault(configs.config_id(cfg), {})
                        per_r[str(R)] = max(per_r.get(str(R), 0), smem)
                        try:
                            bound = configs.smem_bytes(kind[label], cfg, R)
                        except (KeyError, FileNotFoundError):
                            bound = "missing"
                        if not args.write_table and (bound == "missing" or smem > bound):
                            notes.append(f"smem {smem} > the pruner's table entry {bound}: rewrite the table")
                    if cfg in kept and smem > configs.H100_SMEM:
                        notes.append(f"kept by the pruner but {smem} B > the H100's {configs.H100_SMEM}")
                    failures += bool(notes)
                    print(f"{'FAIL' if notes else 'ok  '} {name} regs={res.get('REG')} spill(STACK)B={res.get('STACK')} "
                          f"local={res.get('LOCAL')} smem={smem} bound={bound} "
                          f"{'kept' if cfg in kept else 'pruned'} ({time.time() - t:.1f}s)"
                          + ("".join(f"  <- {n}" for n in notes)), flush=True)
    print(f"{total - failures}/{total} compiled for sm_90 within their bounds")
    if args.write_table:
        path = configs.SMEM_TABLE
        table = json.loads(path.read_text()) if path.exists() else {}
        for kernel, per_cfg in measured.items():
            for cid, per_r in per_cfg.items():
                old = table.setdefault(kernel, {}).setdefault(cid, {})
                for R, b in per_r.items():
                    old[R] = max(old.get(R, 0), b)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)  # written whole or not at all
        print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
