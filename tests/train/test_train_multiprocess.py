"""Two gloo processes (torchrun on CPU) with the same global batch as one process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed next to this python")
def test_two_processes_equal_one_process(base_cfg, tiny_dir, data_file, tmp_path):
    from train import run

    kw = dict(max_steps=4, eval_steps=2, save_steps=2, logging_steps=1, learning_rate=1e-2,
              warmup_steps=1, max_length=64, tag_eval_samples=4, num_sample_generations=1,
              max_new_tokens=6, eval_split_size=0.25, seed=0)
    one = run(base_cfg(per_device_train_batch_size=4, output_dir=str(tmp_path / "one"), **kw))

    out = tmp_path / "two"
    args = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
            "-m", "train", "--model", str(tiny_dir), "--dataset", str(data_file), "--output-dir", str(out),
            "--per-device-train-batch-size", "2", "--cpu-threads", "1", "--report-to", "none"]
    for k, v in kw.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    # Only the main process writes: every record once, the summary printed once.
    assert [r["step"] for r in log] == [r["step"] for r in one.log]
    assert proc.stdout.count("trained 4 steps") == 1
    # Both ranks' RNG states are in the checkpoint (each rank saves its own), nothing else per rank.
    ck = sorted(p.name for p in (out / "checkpoint-4").iterdir())
    assert ck == ["adapter_state.safetensors", "optimizer.bin", "random_states_0.pkl",
                  "random_states_1.pkl", "scheduler.bin", "trainer_state.json"]
    # Same examples per step, gradients summed by gloo all-reduce instead of one batch: fp32
    # summation order differs, nothing else -> rtol 1e-5.
    torch.testing.assert_close([r["loss"] for r in log if "loss" in r],
                               [r["loss"] for r in one.log if "loss" in r], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close([r["eval_loss"] for r in log if "eval_loss" in r],
                               [r["eval_loss"] for r in one.log if "eval_loss" in r], rtol=1e-5, atol=1e-6)
