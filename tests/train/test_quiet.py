"""A quiet start (issue 14): bitsandbytes' kernel-hub probe record, caused by our `kernels` package
name, is dropped at our entry points; every other bitsandbytes record still shows."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from train.quiet import BNB_LOGGER, KernelHubProbeFilter, quiet_start

PROBE = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
         "`pip install kernels` and the kernels >= 0.11.1")  # bitsandbytes 0.50.2, backends/cpu/ops.py


def _record(msg, *args, level=logging.WARNING):
    return logging.LogRecord(BNB_LOGGER, level, "ops.py", 1, msg, args, None)


def test_filter_drops_only_the_name_clash_probe():
    f = KernelHubProbeFilter()
    clash = ImportError("cannot import name 'get_kernel' from 'kernels' (/x/kernels/__init__.py)")
    assert not f.filter(_record(PROBE, clash))
    # the same probe failing for another reason (Hugging Face's kernels installed, hub unreachable)
    assert f.filter(_record(PROBE, OSError("could not reach the hub")))
    assert f.filter(_record(PROBE, ImportError("No module named 'kernels'")))
    # bitsandbytes' real messages pass
    assert f.filter(_record("CUDA error: %s", "out of memory", level=logging.ERROR))
    assert f.filter(_record("some other warning"))


def test_quiet_start_installs_once_on_the_bitsandbytes_logger(caplog):
    quiet_start()
    quiet_start()
    logger = logging.getLogger(BNB_LOGGER)
    assert sum(isinstance(f, KernelHubProbeFilter) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=BNB_LOGGER):
        logger.warning(PROBE, ImportError("cannot import name 'get_kernel' from 'kernels' (here)"))
        logger.warning(PROBE, OSError("hub unreachable"))
        logger.error("a real bitsandbytes error")
    assert [r.getMessage()[:40] for r in caplog.records] == [
        "Failed to load CPU gemm_4bit_forward fro", "a real bitsandbytes error"]


CHILD = """
import logging, sys
from train.quiet import BNB_LOGGER, KernelHubProbeFilter
seen = []
class Keep(logging.Handler):
    def emit(self, record):
        seen.append(record)
logging.getLogger(BNB_LOGGER).addHandler(Keep())
import bitsandbytes
from bitsandbytes.functional import has_avx512bf16
probes = [r for r in seen if "gemm_4bit_forward" in r.getMessage()]
print(bool(has_avx512bf16()), len(probes), sum(KernelHubProbeFilter().filter(r) for r in probes))
"""


@pytest.mark.slow
def test_the_real_probe_record_is_the_one_dropped():
    """In a fresh process: importing bitsandbytes logs the probe record (on CPUs with AVX512-BF16;
    elsewhere it never probes), and the filter drops that very record."""
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    probes_here, probes, kept = child.stdout.split()
    if probes_here != "True":
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not probe the kernel hub here")
    assert (probes, kept) == ("1", "0")


@pytest.mark.slow
def test_default_run_prints_no_warning_lines(tmp_path):
    """`python -m train` with its defaults (shortened to 2 steps): no warning, no bitsandbytes probe
    line; the auto backend says once, in one plain line, which backend it uses and why."""
    run = subprocess.run([sys.executable, "-m", "train", "--max-steps", "2", "--eval-steps", "0", "--save-steps", "0",
                          "--tag-eval-samples", "1", "--num-sample-generations", "0",
                          "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [ln for ln in (run.stdout + "\n" + run.stderr).replace("\r", "\n").splitlines() if ln.strip()]
    assert not [ln for ln in lines if "warn" in ln.lower() or "gemm_4bit_forward" in ln]
    auto = [ln for ln in lines if "backend 'auto'" in ln]
    assert len(auto) == 1 and auto[0].startswith("kernels: backend 'auto' uses torch ("), auto
    if not torch.cuda.is_available():
        assert auto == ["kernels: backend 'auto' uses torch (no CUDA device)"]
