"""Row offsets that can pass 2**31 are computed in 64 bits in the compiled kernels: y stores and x
loads of the forward and gemv kernels, g loads, dx stores and x loads of the backward (fused and
the dequant-mm strategy's LoRA kernels), the down-projection's x loads and the mask kernel's stores (M * N >= 2**31: a 128k-vocab head over 16k
tokens). Checked in the TTIR the JIT would compile for such a call (tests/kernels/ttir_offsets.py,
in a process without Triton's interpreter), on a GPU-less machine too."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).with_name("ttir_offsets.py")


@pytest.fixture(scope="module")
def widths():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_check_sees_an_int32_row_offset(widths):
    assert widths["int32_detector"] == ["i32"]


@pytest.mark.parametrize("kernel,pointers", [
    ("lora_forward_kernel", ["y_ptr", "x_ptr"]),
    ("lora_down_kernel", ["x_ptr"]),
    ("lora_backward_kernel", ["g_ptr", "dx_ptr", "x_ptr"]),
    ("lora_gemv_kernel", ["y_ptr", "x_ptr"]),
    ("lora_up_kernel", ["y_ptr"]),
    ("lora_grad_out_kernel", ["g_ptr"]),
    ("lora_grad_in_kernel", ["x_ptr", "dx_ptr"]),
    ("dropout_mask_kernel", ["out_ptr"]),
])
def test_row_offsets_are_int64(widths, kernel, pointers):
    for ptr in pointers:
        assert widths[kernel][ptr] and set(widths[kernel][ptr]) == {"i64"}, (kernel, ptr, widths[kernel][ptr])
