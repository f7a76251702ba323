"""Faults during a run: a diverging loss, a full disk, Ctrl-C after training, SIGKILL in the middle
of replacing adapter/ and merged/. Each keeps the last good weights and says where they are."""
from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _all_tensors_finite(folder: Path) -> list[str]:
    """Files under `folder` holding a non-finite tensor (safetensors weights and optimizer state)."""
    from safetensors.torch import load_file

    bad = []
    for p in folder.rglob("*.safetensors"):
        if any(not torch.isfinite(t).all() for t in load_file(p).values()):
            bad.append(str(p))
    for p in folder.rglob("optimizer.bin"):
        state = torch.load(p, map_location="cpu", weights_only=True)["state"]
        if any(not torch.isfinite(t).all() for s in state.values() for t in s.values() if torch.is_tensor(t)):
            bad.append(str(p))
    return bad


def _nan_loss_at(monkeypatch, call: int):
    import train.loop as loop

    real, calls = loop.token_losses, {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        s, n = real(*a, **k)
        return (s * math.nan, n) if calls["n"] == call else (s, n)

    monkeypatch.setattr(loop, "token_losses", poisoned)


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(fast_cfg, monkeypatch, capsys):
    from train.__main__ import main

    cfg = fast_cfg(save_steps=1, max_steps=4)
    _nan_loss_at(monkeypatch, 3)  # the loss of step 3 is NaN
    argv = [a for k, v in cfg.to_dict().items() for a in (f"--{k.replace('_', '-')}", str(v))
            if not isinstance(v, bool) and v != ""]
    assert main(argv) == 1
    err = capsys.readouterr().err
    out = Path(cfg.output_dir)
    assert f"error: training diverged at step 3: the loss is nan; stopped without saving any weights of " \
           f"this step (the last good checkpoint {out / 'checkpoint-2'} stays the latest)" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2", "log.jsonl"]  # no adapter
    assert [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == [0, 1, 2]
    assert _all_tensors_finite(out) == []


def test_a_learning_rate_that_diverges_is_stopped_before_anything_non_finite_is_saved(fast_cfg):
    """lr 1e36: step 1 gives huge but finite weights, whose forward overflows at step 2."""
    from train import TrainDiverged, run

    cfg = fast_cfg(learning_rate=1e36, warmup_steps=0, save_steps=1, max_steps=4)
    with pytest.raises(TrainDiverged, match="diverged at step 2: the") as info:
        run(cfg)
    out = Path(cfg.output_dir)
    assert info.value.kept == out / "checkpoint-1" and not (out / "adapter").exists()
    assert _all_tensors_finite(out) == []


def test_weights_made_non_finite_by_a_step_are_never_saved(fast_cfg, monkeypatch):
    """The weights check: a step whose update turns a weight into NaN (the loss and gradients of that
    step were finite) stops the run before its checkpoint is written."""
    from train import TrainDiverged, run

    real, calls = torch.optim.AdamW.step, {"n": 0}

    def poisoning(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = math.nan
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning)
    cfg = fast_cfg(save_steps=1, max_steps=3)
    with pytest.raises(TrainDiverged, match="diverged at step 2: the optimizer step made LoRA weights non-finite"):
        run(cfg)
    out = Path(cfg.output_dir)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert _all_tensors_finite(out) == []


def _fail_writes_of(monkeypatch, name: str):
    """Every write of outputs.write_folder(<out>/<name>) fails with ENOSPC."""
    from train import outputs

    real = outputs.write_folder

    def full(final, write):
        if final.name == name:
            raise OSError(errno.ENOSPC, "No space left on device", str(final))
        return real(final, write)

    monkeypatch.setattr(outputs, "write_folder", full)


def test_full_disk_at_the_end_keeps_the_weights_in_an_emergency_adapter(fast_cfg, monkeypatch, tmp_path, capsys):
    import transformers

    from lora_core import LoraModel
    from train.__main__ import main

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where the emergency copy goes
    _fail_writes_of(monkeypatch, "adapter")
    cfg = fast_cfg(max_steps=2)  # save_steps 0: no checkpoint holds the final weights
    argv = ["--model", cfg.model, "--dataset", cfg.dataset, "--output-dir", cfg.output_dir, "--max-steps", "2",
            "--per-device-train-batch-size", "4", "--max-length", "64", "--eval-split-size", "0.25",
            "--save-steps", "0", "--tag-eval-samples", "0", "--num-sample-generations", "0", "--report-to", "none"]
    assert main(argv) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "(No space left on device)" in err[0], err
    kept = Path(err[0].split(" are kept as a PEFT adapter in ")[1])
    assert kept.parent == tmp_path
    model = LoraModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(cfg.model), kept)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # trained weights
    assert not (Path(cfg.output_dir) / "adapter").exists()


def test_full_disk_at_the_end_points_to_the_final_checkpoint(fast_cfg, monkeypatch):
    from train import TrainFailed, run

    _fail_writes_of(monkeypatch, "adapter")
    cfg = fast_cfg(max_steps=3, save_steps=2)  # checkpoints at 2 and at the last step, 3
    with pytest.raises(TrainFailed, match=r"final weights are in .*checkpoint-3 \(rerun with "
                                          r"--resume-from-checkpoint latest") as info:
        run(cfg)
    monkeypatch.undo()
    # Once there is space again: the resume runs no step and writes the adapter of step 3.
    res = run(fast_cfg(max_steps=3, save_steps=2, resume_from_checkpoint="latest"))
    assert info.value.kept == Path(cfg.output_dir) / "checkpoint-3"
    assert res.steps == 3 and (res.adapter_dir / "adapter_model.safetensors").is_file()


def test_full_disk_while_writing_merged_says_the_adapter_is_complete(fast_cfg, monkeypatch):
    from train import TrainFailed, run

    _fail_writes_of(monkeypatch, "merged")
    with pytest.raises(TrainFailed, match=r"wrote .*adapter, but could not write .*merged") as info:
        run(fast_cfg(max_steps=1, merge=True))
    assert (info.value.kept / "adapter_model.safetensors").is_file()


def test_full_disk_while_checkpointing_names_the_last_complete_checkpoint(fast_cfg, monkeypatch):
    import train.checkpoint as ckpt
    from train import TrainFailed, run

    real = ckpt.outputs.replace_dir

    def full(tmp, final):
        if final.name == "checkpoint-2":
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        return real(tmp, final)

    monkeypatch.setattr(ckpt.outputs, "replace_dir", full)
    cfg = fast_cfg(max_steps=3, save_steps=1)
    with pytest.raises(TrainFailed, match=r"No space left on device.*the last complete checkpoint is "
                                          r".*checkpoint-1$"):
        run(cfg)


def test_ctrl_c_after_training_says_what_is_kept(fast_cfg, monkeypatch, capsys):
    """Not "nothing in --output-dir was changed": training had finished and checkpoint-2 exists."""
    import train.loop as loop
    from train.__main__ import main

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_write_outputs", interrupted)
    cfg = fast_cfg(max_steps=2, save_steps=2)
    argv = ["--model", cfg.model, "--dataset", cfg.dataset, "--output-dir", cfg.output_dir, "--max-steps", "2",
            "--save-steps", "2", "--per-device-train-batch-size", "4", "--max-length", "64",
            "--eval-split-size", "0.25", "--tag-eval-samples", "0", "--num-sample-generations", "0",
            "--report-to", "none"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted after step 2; last checkpoint" in err and "checkpoint-2 is intact" in err
    assert "nothing in --output-dir" not in err


# ---- SIGKILL while adapter/ and merged/ are being replaced -------------------------------------------

def _load_adapter_and_merged(out: Path, tiny_dir: Path) -> tuple[bytes, bytes]:
    """Both folders load (the adapter into the base, merged as a model); their weight bytes."""
    import transformers

    from lora_core import LoraModel

    LoraModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_dir), out / "adapter")
    transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
    return ((out / "adapter" / "adapter_model.safetensors").read_bytes(),
            (out / "merged" / "model.safetensors").read_bytes())


@pytest.mark.slow
def test_sigkill_while_replacing_adapter_and_merged_leaves_old_or_new_never_partial(earlier_run, tiny_dir,
                                                                                     data_file):
    """A resumed run (checkpoint-2 -> step 3, --merge) replaces adapter/ and merged/ of a finished
    run. The test hook (outputs.PAUSE_ENV) stops it at one phase of one replace, where it is
    SIGKILLed. Where the filesystem swaps folders in one step (renameat2), both folders are complete
    under their real names at every phase; in the rename-aside fallback, after recover() (what the
    next run does first). Either way they load and hold the earlier run's bytes or the new run's."""
    from train import outputs

    old = _load_adapter_and_merged(earlier_run, tiny_dir)
    probe = [earlier_run / ".probe-a", earlier_run / ".probe-b"]
    for p in probe:
        p.mkdir()
    swaps = outputs._exchange(*probe)
    for p in probe:
        p.rmdir()
    args = [sys.executable, "-m", "train", "--model", str(tiny_dir), "--dataset", str(data_file),
            "--output-dir", str(earlier_run), "--resume-from-checkpoint", "latest", "--max-steps", "3",
            "--save-steps", "0", "--merge", "--per-device-train-batch-size", "4", "--per-device-eval-batch-size",
            "16", "--max-length", "64", "--learning-rate", "1e-2", "--warmup-steps", "1", "--logging-steps",
            "1", "--eval-steps", "0", "--eval-split-size", "0.25", "--cpu-threads", "1", "--report-to", "none",
            "--seed", "0", "--tag-eval-samples", "0", "--num-sample-generations", "0"]
    # (folder, phase) -> (adapter is new, merged is new) once the run is killed there. "ready": the
    # new folder is complete under .tmp-<name>, the old one still in place (adapter's "ready" is the
    # same case as merged's, so one run covers it).
    phases = {("adapter", "swapped"): (True, False), ("merged", "ready"): (True, False),
              ("merged", "swapped"): (True, True)}
    if not swaps:
        phases.update({("adapter", "aside"): (False, False), ("merged", "aside"): (True, False)})
    new = None
    for (folder, phase), (adapter_new, merged_new) in phases.items():
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS="1", **{outputs.PAUSE_ENV: f"{folder}:{phase}:60"})
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                text=True)
        try:
            tail = []
            for line in proc.stderr:
                tail.append(line)
                m = re.search(r"\[replace\] (\S+) (\S+)", line)
                if m and m.groups() == (folder, phase):
                    break
            else:
                pytest.fail(f"the run ended before {folder} {phase}: {''.join(tail[-5:])}")
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        if swaps:  # complete under the real names right now, before any recovery
            _load_adapter_and_merged(earlier_run, tiny_dir)
        outputs.recover(earlier_run, say=lambda m: None)
        now = _load_adapter_and_merged(earlier_run, tiny_dir)
        assert (now[0] != old[0], now[1] != old[1]) == (adapter_new, merged_new), (folder, phase)
        if adapter_new:  # the step-3 adapter is the same file every time (one process, seeded)
            new = new or now[0]
            assert now[0] == new
        assert not [p.name for p in earlier_run.iterdir() if p.name.startswith(".")], (folder, phase)


def test_weights_check_is_exact_for_huge_finite_values():
    """The fast path (per-tensor norms) overflows for weights ~1e20; the check must still say
    finite, and say non-finite for a single NaN or inf."""
    from train.loop import _all_finite

    huge = [torch.full((4, 4), 1e20), torch.ones(3)]
    assert _all_finite(huge)
    for bad in (math.nan, math.inf):
        t = torch.ones(5)
        t[2] = bad
        assert not _all_finite([torch.ones(2), t])
