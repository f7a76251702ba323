import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# tests/conftest.py puts tests/ on sys.path, where tests/lora_core, tests/kernels, tests/train and
# tests/compare are directories without __init__.py: with the project installed as an editable
# finder (not a path entry), `import lora_core` then resolves to that empty namespace package and
# `lora_core.get_lora_model` is missing. Putting the repo root on sys.path lets the real (regular)
# packages win, and a namespace stand-in that was already imported is dropped so it re-imports.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
for _name in ("lora_core", "kernels", "train", "compare"):
    _mod = sys.modules.get(_name)
    if _mod is not None and getattr(_mod, "__file__", None) is None:
        del sys.modules[_name]


@pytest.fixture(autouse=True)
def _quiet_hf_one_thread():
    # Loading-bar noise from transformers would bury the tables in failure output. One torch thread:
    # the tiny models' ops are microseconds long, and on a 2-core machine shared with other jobs
    # intra-op threads spin-wait on each other far longer than the ops take.
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_train(monkeypatch):
    """install(behaviour): train.run replaced by behaviour(cfg) (a result, or raise), leaving a
    finished run's files (tests/sweep_fakes.py) when it returns; returns the list of the configs it
    runs from then on."""
    import train
    from sweep_fakes import leave_run

    def install(behaviour):
        calls = []

        def fake(cfg):
            calls.append(cfg)
            result = behaviour(cfg)
            leave_run(cfg)
            return result
        monkeypatch.setattr(train, "run", fake)
        return calls
    return install
