"""The loop end to end on a tiny Llama: each quantization, accumulation equivalence, resume,
Ctrl-C, adapter / merged outputs against peft."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch


def _losses(log):
    return [r["loss"] for r in log if "loss" in r]


@pytest.mark.parametrize("quantization", ["none", "nf4", "fp4", "int8"])
def test_loop_learns_with_each_quantization(base_cfg, quantization):
    from train import run

    res = run(base_cfg(quantization=quantization, max_steps=6))
    losses = _losses(res.log)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    # 6 steps at lr 1e-2 on a random base: the eval loss must move down, or nothing was trained.
    assert res.after["eval_loss"] < res.before["eval_loss"] - 0.05, (res.before, res.after)
    assert (res.adapter_dir / "adapter_config.json").is_file()
    assert (res.adapter_dir / "adapter_model.safetensors").is_file()
    out = res.output_dir
    assert (out / "loss.png").stat().st_size > 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert log == json.loads(json.dumps(res.log))  # the file holds exactly the returned log


def test_grad_accumulation_4x1_equals_1x4(base_cfg, tmp_path):
    from train import run

    a = run(base_cfg(per_device_train_batch_size=4, gradient_accumulation_steps=1,
                     output_dir=str(tmp_path / "a")))
    b = run(base_cfg(per_device_train_batch_size=1, gradient_accumulation_steps=4,
                     output_dir=str(tmp_path / "b")))
    # Same examples per step and the loss normalised by the global token count, so only fp32
    # summation order differs (padded [4, T] matmuls vs four [1, T_i] ones): rtol 1e-4.
    torch.testing.assert_close(_losses(a.log), _losses(b.log), rtol=1e-4, atol=1e-6)
    assert a.after["eval_loss"] == pytest.approx(b.after["eval_loss"], rel=1e-4)


def test_interrupt_then_resume_matches_uninterrupted_run(base_cfg, tmp_path, monkeypatch):
    import train.loop as loop
    from train import TrainInterrupted, run

    # dropout 0.1 so the restored RNG state matters; 2 epochs (36 rows / 4 = 9 steps an epoch)
    # would be too slow, so 6 steps with a checkpoint at 3 and the interrupt inside step 5.
    kw = dict(max_steps=6, save_steps=3, lora_dropout=0.1, save_total_limit=1)
    full = run(base_cfg(output_dir=str(tmp_path / "full"), **kw))

    calls = {"n": 0}
    real = loop.token_losses

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # training calls only (eval has its own import): Ctrl-C inside step 5
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(loop, "token_losses", interrupting)
    with pytest.raises(TrainInterrupted) as info:
        run(base_cfg(output_dir=str(out), **kw))
    assert info.value.step == 4 and info.value.checkpoint == out / "checkpoint-3"
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()  # intact after Ctrl-C
    monkeypatch.setattr(loop, "token_losses", real)

    resumed = run(base_cfg(output_dir=str(out), resume_from_checkpoint="latest", **kw))
    # One process, same ops in the same order on the same restored state: equal to fp32 rounding.
    torch.testing.assert_close(_losses(resumed.log), _losses(full.log), rtol=1e-6, atol=1e-7)
    assert resumed.after["eval_loss"] == pytest.approx(full.after["eval_loss"], rel=1e-6)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]  # limit 1 kept


@pytest.fixture(scope="module", params=["none", "nf4"])
def merged_run(request, tiny_dir, data_file, tmp_path_factory):
    """A run with --merge; with nf4 the merged model is still full precision (base reloaded)."""
    from train import TrainConfig, run

    out = tmp_path_factory.mktemp("merged_run")
    return run(TrainConfig(model=str(tiny_dir), dataset=str(data_file), output_dir=str(out), max_steps=3,
                           quantization=request.param,
                           per_device_train_batch_size=4, max_length=64, learning_rate=1e-2,
                           warmup_steps=0, eval_steps=0, save_steps=0, tag_eval_samples=0,
                           num_sample_generations=0, eval_split_size=0.25, cpu_threads=1,
                           report_to="none", merge=True, seed=0))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_loads_in_peft_with_same_outputs(merged_run, tiny_dir):
    import transformers
    from peft import PeftModel

    from lora_core import LoraModel

    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    ours = LoraModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_dir),
                                     merged_run.adapter_dir)
    peft = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_dir),
                                     str(merged_run.adapter_dir))
    base = _logits(transformers.AutoModelForCausalLM.from_pretrained(tiny_dir), ids)
    got, want = _logits(ours, ids), _logits(peft, ids)
    assert (want - base).abs().max() > 1e-3  # the adapter changes the output (it was trained)
    # Same fp32 math through different code paths: rounding only.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merged_model_equals_adapter_on_base(merged_run, tiny_dir):
    import transformers
    from peft import PeftModel

    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(4))
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_run.merged_dir)
    tok = transformers.AutoTokenizer.from_pretrained(merged_run.merged_dir)
    assert tok("ab")["input_ids"] == [1, 14, 15]  # the char tokenizer travelled with the model
    peft = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_dir),
                                     str(merged_run.adapter_dir))
    # W + s*B@A folded into fp32 weights vs the two-branch sum: fp32 re-association only.
    torch.testing.assert_close(_logits(merged, ids), _logits(peft, ids), rtol=1e-4, atol=1e-4)


def test_checkpoints_rotate_and_hold_only_adapter_weights(base_cfg, tmp_path):
    from safetensors.torch import load_file

    from train import run

    out = tmp_path / "ck"
    run(base_cfg(output_dir=str(out), max_steps=4, save_steps=1, save_total_limit=2))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == \
        ["checkpoint-3", "checkpoint-4"]
    assert not list(out.glob(".tmp-*"))
    keys = load_file(out / "checkpoint-4" / "adapter_state.safetensors").keys()
    assert keys and all("lora_" in k for k in keys)  # no frozen base weights in checkpoints
    shutil.rmtree(out)


def test_builtin_model_and_dataset_run_offline(tmp_path):
    """The no-flag defaults (bundled tiny Llama + tagger data), shortened to 2 steps."""
    from train import TrainConfig, run

    res = run(TrainConfig(output_dir=str(tmp_path / "demo"), max_steps=2, eval_steps=0, save_steps=0,
                          tag_eval_samples=2, num_sample_generations=1, max_new_tokens=4,
                          report_to="none"))
    assert res.before["tag_exact_match"] == 0.0  # a random base cannot tag
    assert res.after["eval_loss"] < res.before["eval_loss"]
    assert res.samples and set(res.samples[0]) == {"prompt", "generated", "reference"}


def test_bundled_dataset_is_what_the_script_generates(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "tagger.jsonl"
    subprocess.run([sys.executable, str(root / "scripts" / "make_tagger_data.py"), "--out", str(out)],
                   check=True, capture_output=True)
    assert out.read_bytes() == (root / "train" / "assets" / "tagger.jsonl").read_bytes()
    row = json.loads(out.read_text().splitlines()[0])
    assert set(row) == {"quote", "author", "tags", "label"} and isinstance(row["tags"], list)
    assert row["label"] == row["tags"][0]  # --task seq-cls's class: the first tag
