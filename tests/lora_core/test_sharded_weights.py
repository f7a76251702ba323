"""What FSDP does to a base weight, and how LoraLinear reads it: packed 4-bit bytes stored as a
float dtype (bnb_4bit_quant_storage, so FSDP can shard them), a storage that something cast
numerically, and a weight that is still an FSDP shard (a DTensor)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from lora_core import LoraLinear

ROOT = Path(__file__).resolve().parents[2]
K, N = 128, 64


def make_4bit(storage: torch.dtype, seed: int = 0) -> nn.Module:
    """An nf4 Linear4bit (double quant, bf16 compute) whose packed bytes are held as `storage`."""
    torch.manual_seed(seed)
    lin = nn.Linear(K, N)
    layer = bnb.nn.Linear4bit(K, N, compute_dtype=torch.bfloat16, quant_type="nf4", quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(lin.weight.data.to(torch.bfloat16), requires_grad=False, quant_type="nf4",
                                     quant_storage=storage, module=layer)
    layer.bias = nn.Parameter(lin.bias.data.to(torch.bfloat16), requires_grad=False)
    return layer.to("cpu")  # .to() quantizes


def test_float_quant_storage_gives_the_same_outputs_and_grads_as_uint8():
    """bf16 storage is the same bytes viewed as bf16 words: equal outputs and LoRA grads, exactly."""
    x = torch.randn(5, K, dtype=torch.bfloat16)
    results = []
    for storage in (torch.uint8, torch.bfloat16):
        base = make_4bit(storage)
        assert base.weight.dtype == storage and base.weight.numel() * base.weight.element_size() == N * K // 2
        layer = LoraLinear(base, r=4, lora_alpha=8, init_lora_weights=False, backend="torch")
        torch.manual_seed(1)
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            nn.init.normal_(p)
        y = layer(x)
        y.float().square().sum().backward()
        results.append((y, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_numerically_cast_quant_storage_is_refused():
    """FSDP mixed precision with another param_dtype converts the packed words as numbers: the bytes
    are then garbage, and the dtype no longer matches the layer's quant_storage."""
    base = make_4bit(torch.bfloat16)
    layer = LoraLinear(base, r=4, backend="torch")
    layer(torch.randn(2, K, dtype=torch.bfloat16))  # fine as stored
    base.weight.data = base.weight.data.to(torch.float16)  # what a cast to param_dtype fp16 does
    with pytest.raises(RuntimeError, match="cast the packed bytes numerically"):
        layer(torch.randn(2, K, dtype=torch.bfloat16))


SHARDED = """
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from lora_core import LoraLinear

dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=0, world_size=1)
layer = LoraLinear(nn.Linear(64, 32), r=4, backend="torch")
y = layer(torch.randn(3, 64))  # whole weight: fine, builds the cached record
w = layer.base_layer.weight
mesh = init_device_mesh("cpu", (1,))
layer.base_layer.weight = nn.Parameter(distribute_tensor(w.detach(), mesh, [Shard(0)]), requires_grad=False)
try:
    layer(torch.randn(3, 64))
except RuntimeError as e:
    print("REFUSED", e)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_weight_that_is_still_an_fsdp_shard_is_refused(tmp_path):
    """Outside the FSDP-wrapped model's forward a base weight is a DTensor shard; the cached record
    of the whole weight must not be reused for it, nor a record built from the shard."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SHARDED.format(store=str(tmp_path / "pg"))], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout and "is an FSDP shard (a DTensor)" in proc.stdout, proc.stdout
