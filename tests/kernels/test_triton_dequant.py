"""The dequant-mm strategy's dequantize kernel (kernels/triton/dequant.py) and its shared workspace.

The kernel writes W [N, K] in x.dtype into one buffer per device / dtype / stream; cuBLAS then
multiplies by it, so it must equal the spec (`kernels.reference.dequantize(weight, dtype)`, itself
bitsandbytes' values) bit for bit, at every element: the flat nibble order, the absmax block of
each element, the nested code, the rounding to the quantization dtype before x.dtype. The workspace
is NaN-poisoned first, so an element the kernel skips fails.
"""
import pytest
import torch

from builders import DEVICE, make_weight
from kernels import reference
from kernels.triton import dequant

# (id, fmt, N, K, x dtype, weight options): odd N*K (the masked tail, EVEN=False) and whole tiles
CASES = [
    ("nf4-nested-bf16-odd", "nf4", 35, 77, torch.bfloat16, {}),
    ("nf4-fp32absmax-fp16-odd", "nf4", 33, 130, torch.float16, {"nested": False}),
    ("fp4-nested-bf16-even", "fp4", 64, 128, torch.bfloat16, {}),
    ("nf4-blocksize32-fp16", "nf4", 21, 320, torch.float16, {"blocksize": 32}),
    ("nf4-blocksize128-wfp32-bf16", "nf4", 19, 256, torch.bfloat16, {"blocksize": 128, "dtype": torch.float32}),
    ("nf4-wfp16-bf16", "nf4", 40, 192, torch.bfloat16, {"dtype": torch.float16}),  # two roundings
    ("int8-bf16", "int8", 35, 130, torch.bfloat16, {}),
    ("dense-wfp32-bf16", "dense", 35, 130, torch.bfloat16, {"dtype": torch.float32}),  # a cast
]


@pytest.fixture(autouse=True)
def fresh_workspaces():
    dequant._workspaces.clear()
    yield
    dequant._workspaces.clear()


def _poison(dtype, numel):
    buf = dequant.workspace(DEVICE, dtype, numel)
    buf.fill_(float("nan"))
    return buf


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dequantize_into_workspace_is_the_spec_bit_for_bit(case):
    _, fmt, N, K, dt, wopts = case
    weight, W64 = make_weight(fmt, N, K, **wopts)
    buf = _poison(dt, N * K + 7)  # bigger than the layer: only its first N*K elements are W

    W = dequant.dequantize_into_workspace(weight, dt)

    assert W.shape == (N, K) and W.dtype == dt and W.data_ptr() == buf.data_ptr()
    assert not torch.isnan(W).any()
    assert torch.equal(W, reference.dequantize(weight, dt))
    if fmt in ("nf4", "fp4") and K % wopts.get("blocksize", 64) == 0:  # bnb's CPU kernel is right there
        assert torch.equal(W, W64.to(reference.dequantize(weight).dtype).to(dt))


def test_a_dense_weight_in_x_dtype_is_used_as_is():
    weight, _ = make_weight("dense", 20, 30, dtype=torch.bfloat16)
    assert dequant.dequantize_into_workspace(weight, torch.bfloat16) is weight.kernel_args().w
    assert not dequant._workspaces  # no buffer allocated


def test_one_workspace_grown_to_the_largest_layer_and_reused():
    """Layers share one buffer per (device, dtype): a bigger layer replaces it, smaller ones reuse it,
    and each layer's W is right although the previous layer's was in the same storage."""
    small, big = make_weight("nf4", 16, 64, seed=1)[0], make_weight("nf4", 48, 128, seed=2)[0]
    dequant.dequantize_into_workspace(small, torch.bfloat16)
    W_big = dequant.dequantize_into_workspace(big, torch.bfloat16)
    assert torch.equal(W_big, reference.dequantize(big, torch.bfloat16))
    ptr_big = W_big.data_ptr()
    again = dequant.dequantize_into_workspace(small, torch.bfloat16)
    assert again.data_ptr() == ptr_big  # the grown buffer is reused, not reallocated
    assert torch.equal(again, reference.dequantize(small, torch.bfloat16))
    assert len(dequant._workspaces) == 1 and dequant._workspaces[next(iter(dequant._workspaces))].numel() == 48 * 128
    other = dequant.dequantize_into_workspace(small, torch.float16)  # another dtype, another buffer
    assert len(dequant._workspaces) == 2 and torch.equal(other, reference.dequantize(small, torch.float16))
