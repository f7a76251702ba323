"""Compile every fused kernel for an H100 (sm_90) WITHOUT a GPU: Triton's full pipeline (TTIR ->
TTGIR -> LLVM -> PTX -> cubin through the bundled ptxas), per autotune config and format.

What it proves on a CPU-only machine: the kernels use only constructs the NVIDIA backend lowers
(the interpreter accepts more), every config fits the H100's shared memory, and it reports each
kernel's registers / spills / shared memory so the GPU session starts from known resource usage.
Usage: .venv/bin/python benchmarks/aot_compile.py [--quick] [--fmt=nf4-nested ...]
(--quick: the first two configs per kernel; --fmt: only these formats; TRITON_INTERPRET is unset.)
"""
from __future__ import annotations

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import lora_bwd, lora_decode, lora_fwd  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FMTS = {  # name -> (w ptr type, s1 ptr type, weight constexprs)
    "nf4-nested": ("*u8", "*u8", dict(FMT=2, NESTED=True, BS=64, BS2=256, K_EVEN=True, ALIGNED=True,
                                      W_DTYPE=tl.bfloat16)),
    "nf4-fp32absmax": ("*u8", "*fp32", dict(FMT=2, NESTED=False, BS=64, BS2=256, K_EVEN=True, ALIGNED=True,
                                            W_DTYPE=tl.bfloat16)),
    "int8": ("*i8", "*fp32", dict(FMT=1, NESTED=False, BS=64, BS2=256, K_EVEN=True, ALIGNED=False,
                                  W_DTYPE=tl.float32)),
    "dense": ("*bf16", "*bf16", dict(FMT=0, NESTED=False, BS=64, BS2=256, K_EVEN=True, ALIGNED=False,
                                     W_DTYPE=tl.float32)),
}


def _signature(fn, ptrs: dict, floats: set, consts: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(fn, ptrs, floats, consts, cfg):
    consts = {**consts, **cfg.kwargs}
    src = ASTSource(fn, _signature(fn, ptrs, floats, consts), constexprs=consts)
    k = triton.compile(src, target=TARGET, options={"num_warps": cfg.num_warps,
                                                     "num_stages": cfg.num_stages})
    return _resource_usage(k.asm["cubin"]) + (k.metadata.shared,)


def _resource_usage(cubin: bytes) -> tuple:
    """(registers per thread, local-memory bytes = spills) from the bundled cuobjdump."""
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    reg = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return (int(reg.group(1)) if reg else None, int(local.group(1)) if local else None)


def main(quick: bool) -> int:
    failures = 0
    w_common = {"code_ptr": "*fp32", "code2_ptr": "*fp32", "s2_ptr": "*fp32"}
    jobs = []
    only = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--fmt=")]
    for fmt, (wt, st, wc) in FMTS.items():
        if only and fmt not in only:
            continue
        ptr_w = {"w_ptr": wt, "s1_ptr": st, **w_common}
        fl = {"w_offset", "scaling", "keep_scale", "p"}
        fwd_ptrs = {"x_ptr": "*bf16", "y_ptr": "*bf16", "u_ptr": "*fp32", "bias_ptr": "*bf16",
                    "a_ptr": "*fp32", "b_ptr": "*fp32", **ptr_w}
        for u_in in (False, True):  # u accumulated in the K loop / read (dropout)
            lora = dict(HAS_BIAS=True, HAS_LORA=True, U_IN=u_in, R=16)
            for cfg in lora_fwd.GPU_CONFIGS[: 2 if quick else None]:
                jobs.append((f"fwd{'-u_in' if u_in else ''} {fmt}", lora_fwd._lora_fwd_kernel.fn,
                             fwd_ptrs, fl, {**wc, **lora}, cfg))
        bwd_ptrs = {"g_ptr": "*bf16", "x_ptr": "*bf16", "u_ptr": "*fp32", "dx_ptr": "*bf16",
                    "da_ptr": "*fp32", "db_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32", **ptr_w}
        for dx in (True, False):
            bl = dict(HAS_LORA=True, DROPOUT=True, OFFS_64=False, COMPUTE_DX=dx, R=16)
            for cfg in lora_bwd.GPU_CONFIGS[: 2 if quick else None]:
                jobs.append((f"bwd{'' if dx else '-nodx'} {fmt}", lora_bwd._lora_bwd_kernel.fn,
                             bwd_ptrs, fl, {**wc, **bl}, cfg))
        gemv_ptrs = {"x_ptr": "*bf16", "y_ptr": "*bf16", "u_ptr": "*fp32", "up_ptr": "*fp32",
                     "bias_ptr": "*bf16",
                     "b_ptr": "*fp32", **ptr_w}
        for cfg in lora_decode.GPU_CONFIGS[: 2 if quick else None]:
            jobs.append((f"gemv {fmt}", lora_decode._lora_gemv_kernel.fn, gemv_ptrs, fl,
                         {**wc, "HAS_BIAS": True, "HAS_LORA": True, "R": 16, "BLOCK_M": 16}, cfg))
    down_ptrs = {"x_ptr": "*bf16", "a_ptr": "*fp32", "u_ptr": "*fp32"}
    for bm, partial in ((16, True), (64, False)):  # decode (partials) / tiled forward (atomics)
        jobs.append((f"down-M{bm}", lora_fwd._lora_down_kernel, down_ptrs, {"keep_scale", "p"},
                     dict(DROPOUT=True, OFFS_64=False, R=16, PARTIAL=partial, BLOCK_M=bm,
                          BLOCK_K=128),
                     triton.Config({}, num_warps=4, num_stages=3)))
    for name, fn, ptrs, fl, consts, cfg in jobs:
        t = time.time()
        try:
            regs, spills, smem = compile_one(fn, ptrs, fl, consts, cfg)
            if smem > 232448:  # H100: 227 KiB of shared memory per block at most
                failures += 1
                print(f"FAIL {name}: {smem} B of shared memory exceeds the H100's 232448", flush=True)
            print(f"ok   {name:22s} {str(cfg.kwargs):70s} w{cfg.num_warps} s{cfg.num_stages} "
                  f"regs={regs} local(spill)B={spills} smem={smem} ({time.time() - t:.1f}s)", flush=True)
        except Exception as e:  # report every failing variant, then fail
            failures += 1
            msg = str(e).strip().splitlines()
            print(f"FAIL {name:22s} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: "
                  f"{type(e).__name__}: {msg[-1] if msg else ''}", flush=True)
    print(f"{len(jobs) - failures}/{len(jobs)} compiled for sm_90")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main("--quick" in sys.argv))
