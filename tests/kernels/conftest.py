"""Set-up for the kernel tests.

1. Triton runs through its interpreter on machines without CUDA. TRITON_INTERPRET must be set
   before any `@triton.jit` function is created (triton reads it when the decorator runs), so it is
   set here, at conftest import, before pytest imports the test modules and the kernel files they
   import. On a CUDA machine the kernels run for real.
2. `tests/` is on sys.path (tests/conftest.py, and pytest's rootdir insertion), so the directory
   `tests/kernels` (no __init__.py) would be importable as a *namespace package* named `kernels`
   and shadow the real one when pytest is started as `.venv/bin/pytest` (`python -m pytest` adds the
   repository root and does not have the problem). A regular package anywhere on sys.path wins over
   namespace portions, so putting the repository root on sys.path is enough.
"""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
_shadow = sys.modules.get("kernels")
if _shadow is not None and getattr(_shadow, "__file__", None) is None:  # the namespace impostor
    del sys.modules["kernels"]
