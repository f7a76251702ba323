"""Our top-level `kernels` package has the import name of Hugging Face's kernel-hub distribution
`kernels`, which transformers and bitsandbytes probe for. These tests show the probes stay off and
bitsandbytes still works while ours is importable (issue 2, skeleton note).

How each library probes (read from their sources, transformers 5.23.0, bitsandbytes 0.50.2):
- transformers `utils.import_utils.is_kernels_available()`: `importlib.util.find_spec("kernels")`
  (finds ours), then the version of the distribution providing the import name `kernels`: not a
  distribution named `kernels`, so `packages_distributions()` maps it to `lorafuse` (our
  top_level.txt) and reads lorafuse's version. Hub kernels are used only for
  KERNELS_MIN_VERSION <= version < KERNELS_MAX_VERSION (0.18.2 .. 0.19.0); lorafuse 0.1.0 is outside.
- bitsandbytes `backends/cpu/ops.py`, at import on CPUs with AVX512-BF16: `from kernels import
  get_kernel` inside try/except Exception; ours has no `get_kernel`, so the ImportError is caught,
  a warning is logged, and bitsandbytes keeps its own C++ CPU kernels. Side effect: importing
  bitsandbytes imports our `kernels` package.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _ours(module) -> bool:
    return getattr(module, "__file__", None) == str(REPO / module.__name__ / "__init__.py")


def test_our_packages_resolve_to_the_repo():
    """tests/ holds folders named like our packages (tests/kernels, tests/lora_core, ...) and
    conftest puts tests/ on sys.path; if the repo root is not on sys.path too, `import kernels`
    finds the empty test folder as a namespace package before the installed (editable) package."""
    import compare
    import kernels
    import lora_core
    import train
    bad = [m.__name__ for m in (kernels, lora_core, train, compare) if not _ours(m)]
    assert not bad, (f"{bad} import as {[getattr(sys.modules[b], '__path__', None) for b in bad]}, not the "
                     f"packages in {REPO}. Fix: add `pythonpath = [\".\"]` to [tool.pytest.ini_options] "
                     f"(or run `python -m pytest`, which puts the working directory on sys.path).")


def test_transformers_kernel_hub_detection_is_off():
    import kernels
    from transformers.integrations import hub_kernels
    from transformers.utils import import_utils as iu

    iu.is_kernels_available.cache_clear()
    assert iu.is_kernels_available() is False
    # Why: our package is found, but under lorafuse's version, which is outside transformers' range.
    # If this fails, lorafuse's version entered [KERNELS_MIN_VERSION, KERNELS_MAX_VERSION).
    found, version = iu._is_package_available("kernels", return_version=True)
    assert found and _ours(kernels)
    from packaging.version import Version
    if version != "N/A":
        assert not Version(iu.KERNELS_MIN_VERSION) <= Version(version) < Version(iu.KERNELS_MAX_VERSION)
    # The hub integration took its "not installed" branch: no hub kernels, plain decorators.
    assert hub_kernels._kernels_enabled is False
    with pytest.raises(ImportError, match="`kernels` is either not installed or uses an incompatible"):
        hub_kernels.get_kernel("kernels-community/any")


def test_bitsandbytes_quantizes_and_runs_on_cpu():
    """Linear4bit (nf4) and Linear8bitLt quantize and run, matching their own dequantized weights."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
    from bitsandbytes.backends.cpu import ops as cpu_ops

    import kernels
    assert _ours(sys.modules["kernels"]) and hasattr(kernels, "lora_linear")
    # bitsandbytes' hub probe (CPUs with AVX512-BF16 only) failed cleanly and fell back.
    assert getattr(cpu_ops, "gemm_4bit_forward_kernel", None) is None

    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 64)  # W [64, 128], b [64]
    x = torch.randn(4, 128)  # [M, K]

    q4 = bnb.nn.Linear4bit(128, 64, bias=True, quant_type="nf4", compute_dtype=torch.float32)
    q4.load_state_dict(dense.state_dict())
    q4 = q4.to("cpu")  # quantizes here
    assert q4.weight.dtype == torch.uint8 and q4.weight.quant_state is not None
    W4 = bnbF.dequantize_4bit(q4.weight.data, q4.weight.quant_state)  # [64, 128] fp32
    ref4 = x @ W4.T + dense.bias
    with torch.no_grad():
        q4.train()  # dequantize + fp32 matmul
        y_train = q4(x)
        q4.eval()  # CPU inference path (bf16 gemv on AVX512-BF16 CPUs; repacks weight.data in place)
        y_eval = q4(x)
    # train path: same dequantized W, fp32 matmul -> fp32 rounding only.
    torch.testing.assert_close(y_train, ref4, atol=1e-5, rtol=1e-5)
    # eval path: on AVX512-BF16 CPUs this is the gemv that the hub probe would have replaced; it
    # rounds x and absmax to bf16 (8-bit mantissa, 2^-8 relative): measured 5.8e-3 max error on
    # outputs of magnitude ~1.6 here, so 2e-2 leaves a 3x margin; a broken kernel is off by O(1).
    torch.testing.assert_close(y_eval, ref4, atol=2e-2, rtol=1e-2)

    q8 = bnb.nn.Linear8bitLt(128, 64, bias=True, has_fp16_weights=False, threshold=0.0)
    q8.load_state_dict(dense.state_dict())
    q8 = q8.to("cpu")  # quantizes here: CB int8 [64, 128], SCB fp32 [64]
    assert q8.weight.dtype == torch.int8 and q8.weight.SCB is not None
    W8 = q8.weight.data.float() * q8.weight.SCB[:, None] / 127  # [64, 128]
    with torch.no_grad():
        y8 = q8(x)
    # bitsandbytes 0.50.2 on CPU multiplies by the dequantized W in fp32 (measured 2.4e-7 max
    # error), so 1e-3 is fp32 rounding with room to spare, while a wrong scale or layout is off by
    # O(1). (A bitsandbytes that quantized x to int8 here, as its GPU path does, would need ~1e-2.)
    torch.testing.assert_close(y8.float(), x @ W8.T + dense.bias, atol=1e-3, rtol=1e-3)


def test_fresh_interpreter_outside_the_repo(tmp_path):
    """As a user runs it: bitsandbytes imported first (it probes `kernels`), from another directory."""
    code = (
        "import json, bitsandbytes, kernels\n"
        "from transformers.utils import is_kernels_available\n"
        "print(json.dumps({'kernels': kernels.__file__, 'hub': is_kernels_available(),"
        " 'lora_linear': hasattr(kernels, 'lora_linear')}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"kernels": str(REPO / "kernels" / "__init__.py"), "hub": False, "lora_linear": True}
