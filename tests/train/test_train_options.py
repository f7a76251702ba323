"""Options beyond the defaults each run end to end on a tiny model: bf16 autocast, packing,
full-text loss, gradient checkpointing, epochs + cosine schedule, a seq2seq (T5) base."""
from __future__ import annotations

import math

import pytest

from tiny_models import save_tiny


@pytest.mark.parametrize("kw", [
    dict(mixed_precision="bf16"),
    dict(packing=True, no_completion=True),
    dict(gradient_checkpointing=True, lora_dropout=0.1),
    dict(max_steps=0, num_train_epochs=0.5, lr_scheduler_type="cosine", target_modules="q_proj,v_proj"),
], ids=["bf16", "packing", "grad-checkpointing", "epochs-cosine-qv"])
def test_option_runs_and_trains(base_cfg, kw):
    from train import run

    kw = dict(kw)
    if kw.pop("no_completion", False):
        kw["completion_only_loss"] = False
    res = run(base_cfg(**kw))
    losses = [r["loss"] for r in res.log if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert res.after["eval_loss"] < res.before["eval_loss"], (res.before, res.after)
    if "num_train_epochs" in kw:
        assert res.steps == math.ceil(0.5 * (36 // 4))  # 36 train rows / batch 4 = 9 steps an epoch
        assert res.log[-2]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine reaches 0 at the end


def test_packing_fills_blocks(base_cfg, tiny_dir):
    from train import data as D
    from train.models import load_tokenizer

    tok = load_tokenizer(str(tiny_dir))
    train, _ = D.load_splits(base_cfg().dataset, 0.25, 0)
    t = D.tokenize_causal(train, tok, "{quote} ->: {tags}", " ->: ", True, 64)
    p = D.pack(t, 64)
    assert all(len(x) == 64 for x in p["input_ids"])
    assert len(p) == sum(len(x) for x in t["input_ids"]) // 64


def test_completion_only_labels_mask_the_prompt(tiny_dir, base_cfg):
    from train import data as D
    from train.models import load_tokenizer

    tok = load_tokenizer(str(tiny_dir))
    train, _ = D.load_splits(base_cfg().dataset, 0.25, 0)
    row = D.tokenize_causal(train.select([0]), tok, "{quote} ->: {tags}", " ->: ", True, 128)[0]
    text = "{quote} ->: {tags}".format(**train[0])
    kept = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    # char tokenizer: exactly the completion's characters + eos are trained on
    assert tok.decode(kept) == text.split(" ->: ")[1] + "</s>"


def test_seq2seq_t5(base_cfg, tmp_path):
    from train import run
    from train.models import build_char_tokenizer

    path = tmp_path / "t5"
    save_tiny("t5", path)
    build_char_tokenizer().save_pretrained(path)
    res = run(base_cfg(model=str(path), max_steps=4))
    assert res.after["eval_loss"] < res.before["eval_loss"]
    assert '"task_type": "SEQ_2_SEQ_LM"' in (res.adapter_dir / "adapter_config.json").read_text()


def test_tensorboard_tracker_logs_the_same_scalars(base_cfg):
    """--report-to tensorboard: Accelerate's tracker writes event files under the output dir with the
    train loss of every logged step, equal to log.jsonl's (the two sinks see one record)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train import run

    res = run(base_cfg(report_to="tensorboard", max_steps=3))
    events = list(res.output_dir.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {res.output_dir}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"loss", "lr", "eval_loss"} <= set(acc.Tags()["scalars"]), acc.Tags()["scalars"]
    tb_loss = {e.step: e.value for e in acc.Scalars("loss")}
    jsonl_loss = {r["step"]: r["loss"] for r in res.log if "loss" in r}
    assert sorted(tb_loss) == sorted(jsonl_loss) == [1, 2, 3]
    for step, v in jsonl_loss.items():
        assert tb_loss[step] == pytest.approx(v, rel=1e-6)  # stored as fp32 by TensorBoard
