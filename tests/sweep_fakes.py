"""Stand-ins for train.run in sweep tests: what a run returns (as far as a sweep row reads it) and
what it leaves in its folder, so sweeps of many settings run in milliseconds. The real checks
before the runs (train.preflight) stay."""
from __future__ import annotations

import json
import types
from pathlib import Path


def fake_result(loss: float = 4.0, train_loss: float | None = None, tokens_per_s: float = 100.0):
    """What train.run returns, as far as a sweep row reads it (train.loop.TrainResult)."""
    return types.SimpleNamespace(before={"eval_loss": 5.0}, after={"eval_loss": loss, "tag_exact_match": None},
                                 log=[{"loss": loss + 0.5 if train_loss is None else train_loss,
                                       "tokens_per_s": tokens_per_s}],
                                 steps=2, train_seconds=0.2)


def leave_run(cfg) -> None:
    """What a finished train run leaves in its folder, as far as a sweep looks: log.jsonl and the
    adapter's config (train/outputs.py: RUN_FILES, adapter/)."""
    out = Path(cfg.output_dir)
    (out / "adapter").mkdir(parents=True, exist_ok=True)
    (out / "adapter" / "adapter_config.json").write_text(json.dumps({"r": cfg.r, "peft_type": "LORA"}))
    (out / "log.jsonl").write_text(json.dumps({"step": 0}) + "\n")
