import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py importable as `tiny_models`

# Triton's interpreter on machines without CUDA (tests/kernels/conftest.py says why it must be set
# before triton is imported). Also here, the first conftest pytest loads: test modules collected
# before tests/kernels (tests/compare) import `kernels`, whose torch.compile support imports
# torch._dynamo, which imports triton.
if not torch.cuda.is_available():
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    # Tests never reach a hub: tiny models are built from configs and saved to temp dirs.
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
