"""Data that would train on nothing, or on the wrong text, is refused before the model loads, and
unreadable files are named down to the line."""
from __future__ import annotations

import json

import pytest


def _expect(cfg, match):
    from train import TrainError, run

    with pytest.raises(TrainError, match=match) as info:
        run(cfg)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.usefixtures("no_model_load")
class TestRefusedData:
    def test_max_length_that_truncates_every_completion_away(self, fast_cfg):
        # Every prompt ("<quote> ->: ") is longer than 12 characters: eval would read loss 0.0, ppl 1.0.
        _expect(fast_cfg(max_length=12), r"--max-length 12 leaves no target token in any of the 36 train rows "
                                         r"\(the prompt fills the whole length\): nothing to train on")

    def test_row_without_a_template_column_names_the_row(self, fast_cfg, tmp_path, data_file):
        rows = [json.loads(x) for x in data_file.read_text().splitlines()]
        del rows[6]["tags"]  # today: trained as the text "... ->: None"
        path = tmp_path / "missing.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        msg = _expect(fast_cfg(dataset=str(path)), r"row 7 of the train split of .*missing.jsonl has no value "
                                                   r"for column 'tags', which --text-template needs")
        assert rows[6]["quote"][:20] in msg

    def test_non_utf8_file_names_the_line(self, fast_cfg, tmp_path, data_file):
        lines = data_file.read_text().splitlines()
        path = tmp_path / "latin1.jsonl"
        path.write_bytes("\n".join(lines[:4]).encode() + b'\n{"quote": "caf\xe9", "tags": ["x"]}\n'
                         + "\n".join(lines[4:]).encode())
        _expect(fast_cfg(dataset=str(path)), r"latin1.jsonl is not UTF-8 text: byte 0xe9 on line 5")

    def test_malformed_json_line_names_the_line(self, fast_cfg, tmp_path, data_file):
        lines = data_file.read_text().splitlines()
        lines[9] = lines[9][:-1]  # drop the closing brace of row 10
        path = tmp_path / "broken.jsonl"
        path.write_text("\n".join(lines) + "\n")
        _expect(fast_cfg(dataset=str(path)), r"broken.jsonl: line 10 is not valid JSON")

    def test_unknown_target_modules_before_the_weights_load(self, fast_cfg):
        # lora_core's own message (matched nothing; these exist), as one line, before any weight loads.
        msg = _expect(fast_cfg(target_modules="no_such_layer"),
                      r"--target-modules no_such_layer: .*matched no module of this LlamaForCausalLM")
        assert "q_proj" in msg
        # One unknown name among known ones: peft would adapt the others without a word.
        msg = _expect(fast_cfg(target_modules="q_proj,no_such_layer"),
                      r"no_such_layer matched no linear layer of this LlamaForCausalLM")
        assert "'v_proj'" in msg

    def test_triton_kernel_without_cuda_or_interpreter(self, fast_cfg, monkeypatch):
        import torch

        if torch.cuda.is_available():
            pytest.skip("triton can run here")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        _expect(fast_cfg(backend="triton"), r"--backend triton needs a CUDA GPU, or TRITON_INTERPRET=1")

    def test_triton_kernel_without_autocast(self, fast_cfg, monkeypatch):
        # Would be a traceback from kernels.dispatch at the first forward, after the model loaded.
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        _expect(fast_cfg(backend="triton"), r"--backend triton takes fp16/bf16 activations.*--mixed-precision bf16")


def test_targets_check_counts_rows_and_warns_on_a_large_share(capsys):
    import datasets

    from train import TrainError
    from train.data import check_targets

    def ds(labels):
        return datasets.Dataset.from_dict({"input_ids": [[0] * len(x) for x in labels], "labels": labels})

    kept, lost = [-100, -100, 5, 6], [-100, -100, -100]
    check_targets({"train": ds([kept] * 9 + [lost]), "eval": ds([kept] * 10)}, shift=1, max_length=4)
    assert "leaves no target token in 1 of 10 train rows (10%)" in capsys.readouterr().err
    check_targets({"train": ds([kept] * 19 + [lost]), "eval": ds([kept])}, shift=1, max_length=4)
    assert capsys.readouterr().err == ""  # 5%: below the warning share
    with pytest.raises(TrainError, match=r"any of the 2 eval rows .*nothing to evaluate \(loss would read 0.0\)"):
        check_targets({"train": ds([kept]), "eval": ds([lost, lost])}, shift=1, max_length=4)
    # Label 0 of a causal LM is never predicted: a row whose only target is there has none.
    with pytest.raises(TrainError, match="any of the 1 train rows"):
        check_targets({"train": ds([[7, -100]]), "eval": ds([kept])}, shift=1, max_length=2)


def test_eval_of_a_split_without_targets_is_nan_never_zero():
    import torch

    from train.evaluate import eval_loss

    class Acc:
        def gather_for_metrics(self, x):
            return x

    class M(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("O", (), {"logits": torch.zeros(*input_ids.shape, 5)})()

    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3),
             "labels": torch.full((1, 3), -100)}
    out = eval_loss(M(), [batch], Acc(), seq2seq=False)
    assert out["eval_loss"] != out["eval_loss"] and out["perplexity"] != out["perplexity"]  # NaN
