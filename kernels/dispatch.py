"""Backend choice for `kernels.lora_linear`: which module implements the ops for one call.

"torch" -> `kernels.reference`. "triton" -> the Triton op module for the weight's format, imported
lazily (`kernels.lora_4bit`, `kernels.lora_int8`, `kernels.lora_dense`). "auto" -> the Triton module
on CUDA when it supports the format, dtypes and shapes; the reference otherwise, with a warning
naming the reason, once per reason per process.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Optional

import torch

from . import reference
from .weights import DenseWeight, Int8Weight, Quant4bitWeight

BACKENDS = ("auto", "torch", "triton")

# The Triton op file for each weight format (module name inside the `kernels` package).
TRITON_MODULES = {Quant4bitWeight: "lora_4bit", Int8Weight: "lora_int8", DenseWeight: "lora_dense"}
# The dtypes the Triton kernels take for activations, unless the op module says otherwise.
TRITON_X_DTYPES = (torch.float16, torch.bfloat16)

_modules: dict[str, Optional[ModuleType]] = {}  # import cache: None = not importable
_import_errors: dict[str, str] = {}
_warned: set[str] = set()  # fallback reasons already reported


def triton_module(weight) -> Optional[ModuleType]:
    """The Triton op module for this weight format, or None if it cannot be imported."""
    name = TRITON_MODULES[type(weight)]
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"{__package__}.{name}")
        except ImportError as e:  # triton missing, or the op file not written yet
            _modules[name] = None
            _import_errors[name] = f"{type(e).__name__}: {e}"
    return _modules[name]


def _missing_module_message(weight) -> str:
    name = TRITON_MODULES[type(weight)]
    return (f"the Triton op for {type(weight).__name__} (kernels/{name}.py) is not available "
            f"({_import_errors.get(name, 'not importable')})")


def triton_unsupported_reason(ops: ModuleType, x, weight, bias, A, B, dropout_p) -> Optional[str]:
    """Why the Triton op cannot take this call (None: it can). Asks the op module when it can say."""
    ask = getattr(ops, "unsupported_reason", None)
    if ask is not None:
        return ask(x, weight, bias, A, B, dropout_p)
    if x.dtype not in TRITON_X_DTYPES:
        what = "fp32" if x.dtype == torch.float32 else str(x.dtype)
        return f"{what} activations not supported by the triton kernels (use fp16 or bf16)"
    return None


def interpreter_on() -> bool:
    """Triton runs on CPU tensors only through its interpreter (TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose(backend: str, x, weight, bias, A, B, dropout_p) -> ModuleType:
    """The ops module for one call (x [M, K] already validated). Raises for an impossible request."""
    if backend == "torch":
        return reference
    if backend == "triton":
        if x.device.type == "cpu" and not interpreter_on():
            raise RuntimeError("backend='triton' on CPU tensors needs Triton's interpreter: set the "
                               "environment variable TRITON_INTERPRET=1 before triton is imported, "
                               "or use backend='torch' / 'auto'")
        ops = triton_module(weight)
        if ops is None:
            raise NotImplementedError(f"backend='triton': {_missing_module_message(weight)}; "
                                      "use backend='torch' or 'auto'")
        reason = triton_unsupported_reason(ops, x, weight, bias, A, B, dropout_p)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run this call: {reason}. "
                             "Use backend='auto' to fall back to the torch reference.")
        return ops
    # auto
    reason = _auto_reason(x, weight, bias, A, B, dropout_p)
    if reason is None:
        return triton_module(weight)
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"kernels.lora_linear(backend='auto') uses the torch reference: {reason}.",
                      RuntimeWarning, stacklevel=3)
    return reference


def _auto_reason(x, weight, bias, A, B, dropout_p) -> Optional[str]:
    if x.device.type != "cuda":
        return ("no CUDA device" if not torch.cuda.is_available()
                else f"inputs on {x.device.type}, the triton kernels need CUDA tensors")
    ops = triton_module(weight)
    if ops is None:
        return _missing_module_message(weight)
    return triton_unsupported_reason(ops, x, weight, bias, A, B, dropout_p)


def reset_warnings() -> None:
    """Forget which fallback reasons were reported (for tests)."""
    _warned.clear()
