"""`python -m train --task seq-cls --label-column label` (issue 14): sequence classification with
the accuracy in the before/after table, the head trained in full (modules_to_save), the adapter
usable by peft and by lora_core, bad labels refused before the model loads."""
from __future__ import annotations

import contextlib
import io
import json

import peft
import pytest
import torch
import transformers

from lora_core import AutoLoraModelForSequenceClassification, LoraModel
from train import data as D


@pytest.fixture(scope="module")
def cls_run(tiny_dir, data_file, tmp_path_factory):
    """One short classification run on the tests' tiny Llama (36 train / 12 eval rows), merged too."""
    from train import TrainConfig, run

    out = tmp_path_factory.mktemp("cls") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = run(TrainConfig(model=str(tiny_dir), dataset=str(data_file), output_dir=str(out), task="seq-cls",
                              label_column="label", max_steps=6, per_device_train_batch_size=4,
                              per_device_eval_batch_size=16, max_length=64, learning_rate=1e-2, warmup_steps=1,
                              logging_steps=1, eval_steps=0, save_steps=0, eval_split_size=0.25, cpu_threads=1,
                              report_to="none", seed=0, merge=True))
    return res, buf.getvalue()


def _eval_rows(data_file):
    raw = D.load_raw(str(data_file))
    train_raw, eval_raw = D.split_eval(raw, str(data_file), 0.25, 0)
    return D.class_ids(raw, "label", "x"), eval_raw


def test_table_shows_accuracy_and_the_run_learns(cls_run):
    res, printed = cls_run
    assert set(res.before) >= {"eval_loss", "accuracy"} and "perplexity" not in res.after
    assert res.after["eval_loss"] < res.before["eval_loss"]
    table = printed[printed.index("before"):]
    assert "accuracy" in table and "perplexity" not in table and "tag exact match" not in table
    assert f"{100 * res.after['accuracy']:.1f}%" in table


def test_accuracy_is_what_the_saved_adapter_scores(cls_run, tiny_dir, data_file):
    """The adapter (head included) on a fresh base, run by hand on the eval rows: the same accuracy."""
    res, _ = cls_run
    classes, eval_raw = _eval_rows(data_file)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=len(classes))
    base.config.pad_token_id = 0
    model = LoraModel.from_pretrained(base, res.adapter_dir)
    tok = transformers.AutoTokenizer.from_pretrained(res.adapter_dir)
    texts = D.render("{quote}", eval_raw.to_dict())
    labels = torch.tensor([classes[v] for v in eval_raw["label"]])
    hits = 0
    with torch.no_grad():
        for text, label in zip(texts, labels):  # one row at a time: no padding question
            logits = model(**tok(text, return_tensors="pt")).logits
            hits += int(logits.argmax(-1).item() == label)
    assert hits / len(texts) == pytest.approx(res.after["accuracy"])


def test_adapter_is_a_seq_cls_adapter_peft_opens(cls_run, tiny_dir, data_file):
    res, _ = cls_run
    config = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    assert "score" not in config["target_modules"]  # the head trains in full, not through LoRA
    classes, eval_raw = _eval_rows(data_file)
    tok = transformers.AutoTokenizer.from_pretrained(res.adapter_dir)
    enc = tok(D.render("{quote}", eval_raw.select(range(1)).to_dict()), return_tensors="pt")

    def base():
        m = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=len(classes))
        m.config.pad_token_id = 0
        return m
    ours = AutoLoraModelForSequenceClassification.from_pretrained(res.adapter_dir, num_labels=len(classes))
    ours.config.pad_token_id = 0
    theirs = peft.PeftModelForSequenceClassification.from_pretrained(base(), res.adapter_dir)
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(res.merged_dir)
    assert merged.config.id2label == {i: c for c, i in classes.items()}
    with torch.no_grad():
        a = ours(**enc).logits
        torch.testing.assert_close(theirs(**enc).logits, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(**enc).logits, a, rtol=1e-4, atol=1e-5)  # merged W + delta in fp32


def _expect(cfg, match):
    from train import TrainError, run

    with pytest.raises(TrainError, match=match) as info:
        run(cfg)
    assert "\n" not in str(info.value)


@pytest.mark.usefixtures("no_model_load")
class TestBadLabels:
    def test_missing_label_column(self, fast_cfg):
        _expect(fast_cfg(task="seq-cls", label_column="grade"),
                r"--label-column 'grade' is not a column of .*; its columns are: quote, author, tags, label")

    def test_list_valued_labels(self, fast_cfg):
        _expect(fast_cfg(task="seq-cls", label_column="tags"),
                r"row 1 of the train split of .* holds list \[.*\] in --label-column 'tags'; each row needs one class")

    def test_one_class_only(self, fast_cfg, tmp_path, data_file):
        rows = [dict(json.loads(x), label="same") for x in data_file.read_text().splitlines()]
        path = tmp_path / "one.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        _expect(fast_cfg(task="seq-cls", dataset=str(path)), r"holds 1 class\(es\) \(\['same'\]\); classification "
                                                             r"needs at least two")

    def test_text_that_names_the_label(self, fast_cfg):
        _expect(fast_cfg(task="seq-cls", text_template="{quote} {label}"), r"names --label-column 'label': the "
                                                                             r"classifier would read its answer")

    def test_prompt_method_refused(self, fast_cfg):
        _expect(fast_cfg(task="seq-cls", method="prompt-tuning"),
                r"--task seq-cls with --method prompt-tuning: the new classification head must train in full")

    def test_encoder_decoder_refused(self, fast_cfg, tmp_path):
        from tiny_models import save_tiny
        _expect(fast_cfg(task="seq-cls", model=str(save_tiny("t5", tmp_path / "t5"))),
                r"--task seq-cls: --model .* is an encoder-decoder")


def test_fsdp_refuses_seq_cls(fast_cfg, monkeypatch):
    from train import TrainError, fsdp

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainError, match="--fsdp with --task seq-cls: sharding is built and tested for language"):
        fsdp.check(fast_cfg(task="seq-cls", fsdp=True))
