"""Builder for tests/kernels/test_triton_int64.py: the TTIR of every kernel a call launches, and the
integer width of each row offset `m * stride` feeding its loads and stores.

Run as a script in a process WITHOUT Triton's interpreter (the interpreter has no compiler):
    python tests/kernels/ttir_offsets.py  ->  JSON {kernel: {"<pointer arg>": [widths of its row
    multiplications], ...}} for calls whose M * N (or M * K) is 2**31 elements, built on meta tensors
    (no memory) and compiled by kernels.triton.aot exactly as the JIT would specialise them.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

_DEF = re.compile(r"^\s*(%[\w.#-]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_USE = re.compile(r"%[\w.-]+")


def row_offset_widths(ttir: str, ptr_arg: str, stride_arg: str) -> list[str]:
    """Element types ("i32" / "i64") of every arith.muli by `stride_arg` on the way to a tt.load /
    tt.store through `ptr_arg` (the TTIR after inlining: one function, SSA values named)."""
    defs = {}
    for line in ttir.splitlines():
        m = _DEF.match(line)
        if m:
            name, op, rest = m.groups()
            rest = rest.split(" loc(")[0]
            defs[name] = (op, _USE.findall(rest.split(" : ")[0]), rest.rsplit(" : ", 1)[-1])
    memo: dict = {}

    def depends(v: str, arg: str) -> bool:
        if v == arg:
            return True
        if v not in memo:
            memo[v] = False  # cycles (loop-carried values) end here
            memo[v] = any(depends(o, arg) for o in defs.get(v, ("", [], ""))[1])
        return memo[v]

    widths, seen = [], set()

    def walk(v: str) -> None:
        if v in seen or v not in defs:
            return
        seen.add(v)
        op, operands, ty = defs[v]
        if op == "arith.muli" and depends(v, stride_arg):
            widths.append(re.findall(r"x?(i\d+)>?$", ty.strip())[-1])
        for o in operands:
            walk(o)

    for line in ttir.splitlines():
        s = line.strip()
        if s.startswith(("tt.store ", "tt.atomic_rmw")) or " = tt.load " in s:
            ptr = _USE.findall(s.split("tt.store ", 1)[-1] if s.startswith("tt.store") else s.split("tt.load ", 1)[-1])[0]
            if depends(ptr, ptr_arg):
                walk(ptr)
    return widths


def _detector(aot) -> list[str]:
    """The check's own control: a kernel storing at offs_m * stride in int32 reads as ["i32"]."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def int32_rows(y_ptr, M, stride_ym, BLOCK: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + tl.arange(0, BLOCK)[None, :], 0.0, mask=offs_m[:, None] < M)

    (launched,) = aot.capture(lambda: int32_rows[(1,)](torch.empty(1, device="meta"), 16384, 131072, BLOCK=16))
    return row_offset_widths(aot.ttir(launched), "%y_ptr", "%stride_ym")


def main() -> dict:
    import torch

    from kernels.call import make_call
    from kernels.formats import NestedAbsmax, Quant4bitWeight
    from kernels.triton import aot, configs, launch, utils

    launch.smem_limit = lambda device=None: configs.H100_SMEM  # what the pruner sees: an H100

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    def nf4(N, K):
        nb = N * K // 64
        return Quant4bitWeight(packed=meta(N * K // 2, 1, dtype=torch.uint8), absmax=meta(nb, dtype=torch.uint8),
                               code=meta(16, dtype=torch.float32), blocksize=64, shape=(N, K), quant_type="nf4",
                               dtype=torch.bfloat16,
                               nested=NestedAbsmax(code=meta(256, dtype=torch.float32),
                                                   absmax=meta(-(-nb // 256), dtype=torch.float32),
                                                   blocksize=256, offset=0.0))

    # y [M, N] = 2**31 elements: a 128k-vocab head (N = 131072) over 16k tokens
    M, K, N, r = 16384, 1024, 131072, 16
    w = nf4(N, K)
    A, B = meta(r, K, dtype=torch.float32), meta(N, r, dtype=torch.float32)
    seed = meta(1, dtype=torch.int64)
    call = make_call(meta(M, K), w, None, A, B, 2.0, 0.1, True, None, None)
    passes = []
    for forced in ("fused", "dequant-mm"):  # every large-M strategy's kernels
        os.environ["LORAFUSE_STRATEGY"] = forced
        passes += aot.capture(lambda: launch.forward(call, seed))
        passes += aot.capture(lambda: launch.backward(meta(M, N), meta(M, K), meta(M, r, dtype=torch.float32), w, A,
                                                      B, 2.0, 0.1, seed))
    os.environ["LORAFUSE_STRATEGY"] = "gemv"
    passes += aot.capture(lambda: launch.forward(make_call(meta(16, K), w, None, A, B, 2.0, 0.0, False, None, None),
                                                 None))
    del os.environ["LORAFUSE_STRATEGY"]
    # the mask kernel the tests compare with the spec, at 2**31 elements (W itself is refused at
    # that size by its record, Quant4bitWeight.kernel_args: the tile loaders' flat offsets are int32)
    util = aot.capture(lambda: utils.dropout_mask(3, 16384, 2**31 // 16384, 0.1, "meta"))
    checks = {
        "lora_forward_kernel": [("y_ptr", "%stride_ym"), ("x_ptr", "%stride_xm")],
        "lora_down_kernel": [("x_ptr", "%stride_xm")],
        "lora_backward_kernel": [("g_ptr", "%stride_gm"), ("dx_ptr", "%stride_dxm"), ("x_ptr", "%stride_xm")],
        "lora_gemv_kernel": [("y_ptr", "%stride_ym"), ("x_ptr", "%stride_xm")],
        "lora_up_kernel": [("y_ptr", "%stride_ym")],
        "lora_grad_out_kernel": [("g_ptr", "%stride_gm")],
        "lora_grad_in_kernel": [("x_ptr", "%stride_xm"), ("dx_ptr", "%stride_dxm")],
        "dropout_mask_kernel": [("out_ptr", "%K")],
        "dequant_4bit_kernel": [],  # flat offsets, int64 from the start (no row stride)
    }
    out = {"int32_detector": _detector(aot)}
    for launched in passes + util:
        text = aot.ttir(launched, launched.configs()[0])
        out[launched.name] = {ptr: row_offset_widths(text, "%" + ptr, stride)
                              for ptr, stride in checks[launched.name]}
    return out


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    print(json.dumps(main()))
