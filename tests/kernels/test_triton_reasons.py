"""What the triton backend refuses, and why (`reason`): backend="triton" raises with the reason,
backend="auto" falls back to torch with it. Each check runs before anything is allocated or
launched, so these tests are fast on CPU too. Also: configs pruned by shared memory for the rank.
"""
import dataclasses
import re

import bitsandbytes.functional as bnbF
import pytest
import torch

import kernels
from builders import DEVICE, make_lora, make_weight, rand
from kernels import backends
from kernels.call import make_call
from kernels.formats import DenseWeight, Quant4bitWeight, Unsupported
from kernels.triton import backward, configs, forward, launch

N, K, M = 64, 128, 20


@pytest.fixture(scope="module")
def nf4():
    return make_weight("nf4", N, K)[0]


def _reason(weight, x=None, bias=None, A=..., B=..., p=0.0):
    if A is ...:
        A, B = make_lora(N, K, 8)
    x = rand((M, K), torch.bfloat16) if x is None else x
    return backends.TRITON.reason(make_call(x, weight, bias, A, B, 1.0, p, True, None, None))


def test_fp32_activations_refused_with_the_fix(nf4):
    x = rand((M, K), torch.float32)
    A, B = make_lora(N, K, 8)
    assert "fp32 activations" in _reason(nf4, x=x) and "autocast" in _reason(nf4, x=x)
    assert _reason(nf4) is None
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: fp32 activations"):
        kernels.lora_linear(x, nf4, None, A, B, 1.0, backend="triton")


@pytest.mark.parametrize("what,kwargs,match", [
    ("rank too big", dict(A=torch.zeros(129, K), B=torch.zeros(N, 129)), r"rank r=129 .*\[1, 128\]"),
    ("fp64 LoRA", dict(A=torch.zeros(8, K, dtype=torch.float64), B=torch.zeros(N, 8, dtype=torch.float64)),
     "LoRA weights in torch.float64"),
    ("fp64 bias", dict(bias=torch.zeros(N, dtype=torch.float64)), "float64 bias"),
])
def test_call_reasons(nf4, what, kwargs, match):
    kwargs = {k: v.to(DEVICE) for k, v in kwargs.items()}
    why = _reason(nf4, **kwargs)
    assert why is not None and re.search(match, why), why


@pytest.mark.parametrize("break_it,match", [
    (lambda w: dict(blocksize=48, absmax=torch.zeros(-(-N * K // 48), dtype=torch.uint8),
                    nested=dataclasses.replace(w.nested, absmax=torch.zeros(1))), "power of two"),
    (lambda w: dict(dtype=torch.float64), "float64"),
])
def test_4bit_records_the_kernels_cannot_read(nf4, break_it, match):
    weight = dataclasses.replace(nf4, **{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v)
                                         for k, v in break_it(nf4).items()})
    weight.check()  # a valid record (the torch backend takes it)
    with pytest.raises(Unsupported, match=match):
        weight.kernel_args()
    assert match in _reason(weight)


def test_dense_records_the_kernels_cannot_read():
    W = torch.zeros(N, K, dtype=torch.bfloat16, device=DEVICE)
    assert "broadcast" in _reason(DenseWeight(W[:1].expand(N, K)))
    with pytest.raises(Unsupported, match="float64"):
        DenseWeight(W.double()).kernel_args()


def test_bnb_cpu_repacked_layout_is_refused_by_the_record():
    """bnb's CPU repack (Linear4bit.forward in eval on CPU) changes the layout in place: from_bnb
    refuses it by its flag, and a record built by hand from it fails check() on the 2-D absmax."""
    W = torch.randn(N, K, dtype=torch.bfloat16)
    packed, qs = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    repacked, qs2 = bnbF._convert_weight_packed_for_cpu(packed, qs)
    assert qs2.packing_format_for_cpu
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        Quant4bitWeight.from_bnb(repacked, qs2)
    weight = Quant4bitWeight(packed=repacked, absmax=qs2.absmax, code=qs2.code, blocksize=64, shape=(N, K),
                             quant_type="nf4", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CPU-repacked"):
        weight.check()


# ---- shared memory -------------------------------------------------------------------------------

KERNELS = [("forward", forward.GPU_CONFIGS), ("backward", backward.GPU_CONFIGS)]  # the autotuned ones


@pytest.mark.parametrize("kernel,cands", KERNELS)
def test_the_measured_table_covers_every_config_and_rank(kernel, cands):
    """configs.smem_bytes reads kernels/triton/smem_sm90.json (benchmarks/aot_compile.py
    --write-table): every config the autotuner may try has a figure at every padded rank."""
    for R in (16, 32, 64, 128):
        for c in cands:
            assert 0 < configs.smem_bytes(kernel, c, R) < 2**21, (kernel, configs.config_id(c), R)


@pytest.mark.parametrize("kernel,cands", KERNELS)
def test_configs_are_pruned_by_shared_memory_for_the_rank(kernel, cands):
    """At r = 128 the big configs do not fit an H100 (they used to be kept, and LORAFUSE_AUTOTUNE=0
    kept the first, too big, one for the backward), and some config still does."""
    big = configs.fitting(kernel, cands, 128, configs.H100_SMEM)
    assert big and all(configs.smem_bytes(kernel, c, 128) <= configs.H100_SMEM for c in big)
    assert len(big) < len(cands)
    if kernel == "backward":
        assert cands[0] not in big
    assert configs.fitting(kernel, cands, 128, None) == cands  # the interpreter: no limit


def test_pruner_keeps_a_fitting_config_with_autotune_off(monkeypatch):
    monkeypatch.setattr(launch, "smem_limit", lambda device=None: configs.H100_SMEM)
    prune = configs.pruner("backward")
    everything = prune(backward.GPU_CONFIGS, {"M": 4096}, R=128)
    assert everything == configs.fitting("backward", backward.GPU_CONFIGS, 128, configs.H100_SMEM)
    monkeypatch.setenv("LORAFUSE_AUTOTUNE", "0")
    (first,) = prune(backward.GPU_CONFIGS, {"M": 4096}, R=128)
    assert first == everything[0] and first is not backward.GPU_CONFIGS[0]
    (short,) = configs.pruner("forward")(forward.GPU_CONFIGS, {"M": 20}, R=16)  # no 256-row tiles for 20 rows
    assert short.kwargs["BLOCK_M"] <= 64


def test_no_fitting_fused_config_leaves_the_other_strategies(nf4, monkeypatch):
    """On a device where no "fused" config fits at this rank the call is still taken: the choice
    skips "fused" (even when forced) and says why."""
    monkeypatch.setattr(launch, "smem_limit", lambda device=None: 40_000)
    monkeypatch.setenv("LORAFUSE_STRATEGY", "fused")
    x = rand((M, K), torch.bfloat16)
    call = make_call(x, nf4, None, *make_lora(N, K, 128), 1.0, 0.0, False, None, None)
    assert launch.reason(call) is None
    for pass_ in ("forward", "backward"):
        choice = launch.choose(pass_, M, nf4, 128, x, 0.0)
        assert choice.strategy != "fused" and "no fused config fits the shared memory at rank 128" in choice.why
