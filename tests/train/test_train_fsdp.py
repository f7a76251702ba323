"""FSDP2 on CPU: two gloo processes under torchrun, sharding the base and the LoRA weights.

The launched runs use the same global batch as the one-process run they are compared with
(2 processes x 2 rows against 1 x 4), so every step sees the same examples.
"""
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
TORCHRUN = Path(sys.executable).parent / "torchrun"
ACCELERATE = Path(sys.executable).parent / "accelerate"
# What `accelerate config` writes for FSDP2 on one machine with 2 processes.
ACCELERATE_FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_activation_checkpointing: false
  fsdp_offload_params: false
mixed_precision: 'no'
num_machines: 1
num_processes: 2
rdzv_backend: static
"""
KW = dict(max_steps=4, eval_steps=2, save_steps=2, logging_steps=1, learning_rate=1e-2, warmup_steps=1,
          max_length=64, tag_eval_samples=4, num_sample_generations=1, max_new_tokens=6,
          eval_split_size=0.25, seed=0)
needs_torchrun = pytest.mark.skipif(not (TORCHRUN.exists() and ACCELERATE.exists()),
                                    reason="torchrun / accelerate not installed next to this python")


def _launch(tiny_dir, data_file, out: Path, *flags: str, accelerate_config: Path | None = None,
            **kw) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """`torchrun --nproc_per_node 2 -m train --fsdp ...`, or `accelerate launch --config_file C -m
    train ...` (FSDP from the config file), with KW (overridden by kw); its log records."""
    launcher = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "train", "--fsdp"] \
        if accelerate_config is None else \
        [str(ACCELERATE), "launch", "--config_file", str(accelerate_config), "-m", "train"]
    args = [*launcher, "--model", str(tiny_dir), "--dataset", str(data_file), "--output-dir", str(out),
            "--per-device-train-batch-size", "2", "--cpu-threads", "1", "--report-to", "none", *flags]
    for k, v in {**KW, **kw}.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def _losses(log: list[dict], key: str) -> list[float]:
    return [r[key] for r in log if key in r]


def _peft_logits(tiny_dir, adapter_dir, ids) -> torch.Tensor:
    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
@needs_torchrun
def test_fsdp_dense_equals_one_process_resumes_and_saves_a_peft_adapter(base_cfg, tiny_dir, data_file, tmp_path):
    from train import run

    one = run(base_cfg(per_device_train_batch_size=4, output_dir=str(tmp_path / "one"), **KW))
    out = tmp_path / "fsdp"
    proc, log = _launch(tiny_dir, data_file, out)
    # Really sharded: every parameter is a DTensor and each process holds half of the bytes.
    line = next(x for x in proc.stdout.splitlines() if x.startswith("FSDP2:"))
    held, whole = (float(w) for w in line.replace(" MiB", "").split()[-5::4])
    assert "49 of 49 parameters sharded over 2 processes" in line and held == pytest.approx(whole / 2, rel=0.05)
    assert proc.stdout.count("trained 4 steps") == 1

    # fp32 throughout; the LoRA gradients are reduce-scattered over 2 processes instead of summed in
    # one batch, so only the summation order differs: rtol 1e-5 (measured ~1e-7).
    assert [r["step"] for r in log] == [r["step"] for r in one.log]
    for key in ("loss", "eval_loss", "grad_norm"):
        torch.testing.assert_close(_losses(log, key), _losses(one.log, key), rtol=1e-5, atol=1e-6)
    # The checkpoint holds the same files as an unsharded run's (gathered, not per rank), RNG per rank.
    assert sorted(p.name for p in (out / "checkpoint-2").iterdir()) == [
        "adapter_state.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
        "scheduler.bin", "trainer_state.json"]

    # Resume from step 2 under FSDP: the rest of the trajectory is the uninterrupted FSDP run's.
    # This launch takes FSDP from an Accelerate config file instead of --fsdp.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    config = tmp_path / "fsdp.yaml"
    config.write_text(ACCELERATE_FSDP_CONFIG)
    rproc, rlog = _launch(tiny_dir, data_file, resumed, "--resume-from-checkpoint", "latest",
                          accelerate_config=config)
    assert "49 of 49 parameters sharded over 2 processes" in rproc.stdout
    assert [r["step"] for r in rlog] == [r["step"] for r in log]
    for key in ("loss", "eval_loss", "grad_norm"):
        # same processes, same order of operations: equal up to the last bits
        torch.testing.assert_close(_losses(rlog, key), _losses(log, key), rtol=1e-6, atol=0)

    # The final adapter is a plain PEFT folder: peft loads it unsharded and gives the one-process
    # adapter's outputs (fp32; the weights differ by summation order only).
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = _peft_logits(tiny_dir, out / "adapter", ids)
    ref = _peft_logits(tiny_dir, one.adapter_dir, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (ours - _peft_logits(tiny_dir, None, ids)).abs().max() > 1e-2  # the adapter changes the outputs
    assert json.loads((out / "adapter" / "adapter_config.json").read_text()) == \
        json.loads(Path(one.adapter_dir, "adapter_config.json").read_text())


@pytest.mark.slow
@needs_torchrun
def test_fsdp_qlora_bf16_checkpointing_equals_one_process(base_cfg, tiny_dir, data_file, tmp_path):
    """The combination QLoRA users run: nf4 base stored as bf16 (so FSDP shards it), bf16 mixed
    precision, gradient checkpointing. The one-process reference is the usual QLoRA run (uint8
    storage, bf16 autocast)."""
    from train import run

    qlora = dict(quantization="nf4", mixed_precision="bf16", gradient_checkpointing=True)
    one = run(base_cfg(per_device_train_batch_size=4, output_dir=str(tmp_path / "one"), **KW, **qlora))
    proc, log = _launch(tiny_dir, data_file, tmp_path / "fsdp", "--bnb-4bit-quant-storage", "bfloat16",
                        "--gradient-checkpointing", **KW, quantization="nf4", mixed_precision="bf16")
    assert "sharded over 2 processes" in proc.stdout
    # bf16 compute on both sides, but not the same casts: FSDP gathers every float parameter in bf16
    # and runs without autocast, the reference autocasts each op; the LoRA gradients are reduced
    # in fp32. Measured max relative difference 3e-5; rtol 1e-3 is ~10 bf16 rounding steps of slack.
    for key in ("loss", "eval_loss"):
        torch.testing.assert_close(_losses(log, key), _losses(one.log, key), rtol=1e-3, atol=0)
    assert _losses(log, "eval_loss")[-1] < _losses(log, "eval_loss")[0]


# ---- impossible combinations: refused before any work -----------------------------------------------
@pytest.mark.parametrize("kw, env, message", [
    (dict(), {}, "this is 1 process; launch several processes: torchrun --nproc_per_node N"),
    (dict(quantization="int8"), {"WORLD_SIZE": "2"}, "cannot shard an int8 base"),
    (dict(method="ia3"), {"WORLD_SIZE": "2"}, "built and tested for --method lora only"),
    (dict(quantization="nf4"), {"WORLD_SIZE": "2"}, "needs --bnb-4bit-quant-storage bfloat16"),
    (dict(quantization="nf4", bnb_4bit_quant_storage="float32", mixed_precision="bf16"), {"WORLD_SIZE": "2"},
     "use --bnb-4bit-quant-storage bfloat16"),
    (dict(), {"WORLD_SIZE": "2", "FSDP_VERSION": "1"}, "set fsdp_version: 2"),
    (dict(), {"WORLD_SIZE": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}, "pass --gradient-checkpointing"),
    (dict(), {"WORLD_SIZE": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "cpu_ram_efficient_loading"),
    (dict(), {"WORLD_SIZE": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "on a CPU-only run"),
    (dict(fsdp=False), {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed .* is not supported"),
], ids=["one-process", "int8", "method-ia3", "uint8-storage", "storage-vs-mixed-precision", "fsdp1",
        "accelerate-activation-checkpointing", "cpu-ram-efficient-loading", "offload-on-cpu", "deepspeed"])
def test_fsdp_refuses_impossible_combinations(base_cfg, monkeypatch, tmp_path, kw, env, message):
    from train import TrainError, run

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(TrainError, match=message.replace("(", r"\(").replace("+", r"\+")):
        run(base_cfg(**{"fsdp": True, **kw}))
    assert not (tmp_path / "out").exists()  # nothing written


def test_fsdp_from_an_accelerate_config_is_checked_too(base_cfg, monkeypatch):
    """accelerate launch with an FSDP config file exports ACCELERATE_USE_FSDP: same checks."""
    from train import TrainError, run

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(TrainError, match="the Accelerate config .* this is 1 process"):
        run(base_cfg())


def test_quant_storage_applies_to_4bit_only(base_cfg):
    from train import TrainError, run

    with pytest.raises(TrainError, match="applies to 4-bit bases only"):
        run(base_cfg(bnb_4bit_quant_storage="bfloat16"))


def test_builtin_model_is_saved_on_every_process(tmp_path, monkeypatch):
    """A quantized built-in model is saved to a temp dir and loaded back in each process; transformers
    5's save_pretrained writes on rank 0 only once torch.distributed is up (here: rank 1 of 2)."""
    import transformers.distributed.mixin as mixin

    from train.models import load_base_model, save_builtin

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    save_builtin(tmp_path / "m", seed=3)
    loaded = load_base_model(str(tmp_path / "m"), "none", 0)
    ref = load_base_model("builtin:tiny-llama", "none", 3)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ref.state_dict().values()))
