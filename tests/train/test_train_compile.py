"""python -m train --torch-compile: Accelerate compiles the model (Inductor); the run trains the
same as eager and saves the adapter under the model's own parameter names."""
import json
from pathlib import Path

import pytest

from conftest import QUIET


@pytest.mark.usefixtures("no_model_load")
def test_bad_combinations_fail_before_the_model_loads(base_cfg):
    from train import TrainError, run

    for kw, match in [(dict(torch_compile_mode="max-autotune"), "needs --torch-compile"),
                      (dict(torch_compile=True, method="adalora"), "--torch-compile with --method adalora")]:
        with pytest.raises(TrainError, match=match):
            run(base_cfg(**kw))


@pytest.mark.slow
def test_compiled_run_trains_as_eager_and_saves_plain_names(base_cfg, tmp_path):
    """No LoRA dropout: Inductor draws its own random bits. fp32; Inductor fuses and reorders sums,
    so the losses agree to rounding over 4 AdamW steps (measured 1e-7 relative)."""
    from safetensors.torch import load_file

    from train import run

    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"out{compiled}"
        res = run(base_cfg(output_dir=str(out), torch_compile=compiled, lora_dropout=0.0, **QUIET))
        losses[compiled] = [row["loss"] for row in res.log if "loss" in row]
        keys = sorted(load_file(str(out / "adapter" / "adapter_model.safetensors")))
        assert keys and not any("_orig_mod" in k for k in keys), keys[:3]
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] > 0
    assert len(losses[True]) == len(losses[False]) == 4
    for a, b in zip(losses[True], losses[False]):
        assert abs(a - b) <= 1e-4 * abs(b), losses
