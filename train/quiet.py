"""A quiet start for our entry points (`python -m train`, `python -m train.generate`, `python -m compare`).

bitsandbytes 0.50, on CPUs with AVX512-BF16, probes Hugging Face's kernel hub when it is imported
(`from kernels import get_kernel`). Our own top-level package is also named `kernels` and has no
`get_kernel`, so the probe fails and bitsandbytes logs, on every start:

    Failed to load CPU gemm_4bit_forward from kernels-community: cannot import name 'get_kernel'
    from 'kernels' (.../kernels/__init__.py). Please make sure you already `pip install kernels` ...

It is harmless (bitsandbytes keeps its own CPU kernels) but reads as a failure. `quiet_start()` puts
a filter on that one logger that drops exactly this record: the message that probe logs, caused by
the import error our package name gives. Every other record of bitsandbytes still shows, including
this same message when the probe fails for another reason (Hugging Face's `kernels` installed but
unreachable, say). Standard library only: it must run before anything imports bitsandbytes.
"""
from __future__ import annotations

import logging

BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
PROBE_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
NAME_CLASH = "cannot import name 'get_kernel' from 'kernels'"


class KernelHubProbeFilter(logging.Filter):
    """Drops bitsandbytes' kernel-hub probe record when its cause is our `kernels` package."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(PROBE_MESSAGE):
            return True
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (isinstance(cause, ImportError) and NAME_CLASH in str(cause))


def quiet_start() -> None:
    """Install the filter (once; harmless to call again). Call before bitsandbytes is imported."""
    logger = logging.getLogger(BNB_LOGGER)
    if not any(isinstance(f, KernelHubProbeFilter) for f in logger.filters):
        logger.addFilter(KernelHubProbeFilter())
