"""Resume is checked before anything is loaded: settings that define the training must equal the
checkpoint's (the differences are listed), damaged checkpoints are refused in one line, and the
fields that may change do (an extended run follows its new schedule)."""
from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("kw, listed", [
    (dict(lora_alpha=64.0), ["lora_alpha: 32.0 -> 64.0"]),
    (dict(per_device_train_batch_size=2), ["per_device_train_batch_size: 4 -> 2"]),
    (dict(lora_dropout=0.1, learning_rate=3e-2), ["lora_dropout: 0.0 -> 0.1", "learning_rate: 0.01 -> 0.03"]),
    (dict(r=8), ["r: 16 -> 8"]),  # today: a raw size-mismatch traceback
    (dict(target_modules="q_proj"), ["target_modules: 'all-linear' -> 'q_proj'"]),  # today: "missing []"
], ids=["alpha", "batch", "dropout+lr", "rank", "targets"])
def test_resume_with_other_training_settings_is_refused_listing_them(earlier_run, fast_cfg, no_model_load,
                                                                     unchanged, kw, listed):
    from train import TrainError, run

    same = unchanged(earlier_run)
    with pytest.raises(TrainError) as info:
        run(fast_cfg(resume_from_checkpoint="latest", save_steps=1, **kw))
    msg = str(info.value)
    assert "these settings differ from the checkpoint's run: " + "; ".join(listed) + ";" in msg, msg
    same()


def test_resume_with_another_dataset_is_refused(earlier_run, fast_cfg, no_model_load, tmp_path, data_file):
    from train import TrainError, run

    other = tmp_path / "other.jsonl"
    other.write_text(data_file.read_text())
    with pytest.raises(TrainError, match=rf"dataset: '{data_file}' -> '{other}'"):
        run(fast_cfg(resume_from_checkpoint="latest", save_steps=1, dataset=str(other)))


def test_fields_that_may_change_do_and_an_extended_run_follows_its_new_schedule(earlier_run, fast_cfg,
                                                                               monkeypatch):
    import torch

    from train import run

    used, real = [], torch.optim.AdamW.step

    def recording(self, *a, **k):
        used.append(self.param_groups[0]["lr"])
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    # logging, eval cadence, checkpoints, eval batch and --max-steps upward: allowed.
    res = run(fast_cfg(resume_from_checkpoint="latest", max_steps=4, logging_steps=2, eval_steps=3,
                       save_steps=2, per_device_eval_batch_size=8))
    assert res.steps == 4
    assert [r["step"] for r in res.log if "loss" in r] == [1, 2, 4]  # 1, 2 from the checkpoint, then every 2nd
    assert [r["step"] for r in res.log if "eval_loss" in r] == [0, 3, 4]
    # The checkpointed run's linear schedule had reached lr 0 at its last step (2); the extended run's
    # steps follow the longer one (warm-up 1 step, then linear to 0 at step 4): lr(k) = 0.01 (4 - k) / 3.
    assert used == pytest.approx([0.01 * 2 / 3, 0.01 * 1 / 3], rel=1e-6)


def test_resume_that_would_end_before_the_checkpoint_is_refused(earlier_run, fast_cfg, no_model_load):
    from train import TrainError, run

    with pytest.raises(TrainError, match=r"--max-steps 1 ends before the checkpoint's step 2"):
        run(fast_cfg(resume_from_checkpoint="latest", max_steps=1))


def test_resume_from_an_older_checkpoint_would_replace_newer_ones_and_is_refused(earlier_run, fast_cfg,
                                                                                 no_model_load):
    from train import TrainError, run

    with pytest.raises(TrainError, match=r"not the newest checkpoint .*checkpoint-2 come after it"):
        run(fast_cfg(resume_from_checkpoint=str(earlier_run / "checkpoint-1"), save_steps=1))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize("damage, match", [
    (lambda c: _truncate(c / "optimizer.bin"), r"optimizer.bin cannot be read"),
    (lambda c: _truncate(c / "adapter_state.safetensors"), r"adapter_state.safetensors cannot be read"),
    (lambda c: (c / "trainer_state.json").write_text('{"step": 2, "log": ['), r"trainer_state.json cannot be read"),
    (lambda c: (c / "trainer_state.json").write_text('{"step": 2}'), r"trainer_state.json lacks log, before, config"),
    (lambda c: (c / "random_states_0.pkl").unlink(), r"random_states_0.pkl missing"),
    (lambda c: _truncate(c / "scheduler.bin"), r"scheduler.bin cannot be read"),
], ids=["truncated-optimizer", "truncated-weights", "bad-json", "partial-json", "missing-rng", "truncated-scheduler"])
def test_damaged_checkpoint_is_refused_in_one_line_before_training(earlier_run, fast_cfg, no_model_load,
                                                                   damage, match):
    """Accelerate would fail on most of these with a traceback after the model loaded, and on a
    missing RNG file it would only log "Could not load random states" and resume differently."""
    from train import TrainError, run

    damage(earlier_run / "checkpoint-2")
    with pytest.raises(TrainError, match=match) as info:
        run(fast_cfg(resume_from_checkpoint="latest", save_steps=1))
    assert "damaged or incomplete" in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_with_non_finite_weights_is_refused(earlier_run, fast_cfg, no_model_load):
    import math

    from safetensors.torch import load_file, save_file

    from train import TrainError, run

    path = earlier_run / "checkpoint-2" / "adapter_state.safetensors"
    state = load_file(path)
    name = sorted(state)[0]
    state[name].view(-1)[0] = math.inf
    save_file(state, path)
    with pytest.raises(TrainError, match=rf"non-finite values in {name}"):
        run(fast_cfg(resume_from_checkpoint="latest", save_steps=1))
