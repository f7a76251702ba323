"""`python -m train --method ...`: every PEFT method trains in the one loop and writes a PEFT adapter
that peft loads; AdaLoRA's loop prunes ranks and adds the regulariser; method flags are checked
before any work."""
import json

import peft
import pytest
import torch



@pytest.mark.parametrize("method,extra", [
    ("ia3", {}),
    ("adalora", dict(init_r=4, target_r=2, tinit=1, tfinal=1)),
    ("adaption-prompt", dict(adapter_len=4, adapter_layers=1)),
    ("prompt-tuning", dict(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="tags: ")),
])
def test_each_method_trains_and_its_adapter_loads_in_peft(fast_cfg, tiny_dir, method, extra):
    from train import run
    from train.models import load_base_model

    res = run(fast_cfg(method=method, max_steps=4, **extra))
    assert res.after["eval_loss"] < res.before["eval_loss"]  # it learned something in 4 steps
    saved = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == {"ia3": "IA3", "adalora": "ADALORA", "adaption-prompt": "ADAPTION_PROMPT",
                                  "prompt-tuning": "PROMPT_TUNING"}[method]
    if method == "adalora":  # the loop called update_and_allocate: the final mask meets the budget
        kept = [sum(v) for v in saved["rank_pattern"].values()]
        assert saved["total_step"] == 4 and sum(kept) == 2 * len(kept)
    if method == "prompt-tuning":
        assert saved["tokenizer_name_or_path"] == str(tiny_dir)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    theirs = peft.PeftModel.from_pretrained(load_base_model(str(tiny_dir), "none", 0), res.adapter_dir)
    import lora_core
    ours = lora_core.LoraModel.from_pretrained(load_base_model(str(tiny_dir), "none", 0), res.adapter_dir)
    assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-6)


def test_adalora_loss_in_the_loop_includes_peft_regulariser(fast_cfg, tmp_path):
    """The loop computes its own token loss; for AdaLoRA it adds training_regulariser() (peft adds the
    same term to model(...).loss): with orth_reg_weight 0 the run differs."""
    from train import run

    a = run(fast_cfg(method="adalora", init_r=4, target_r=2, max_steps=3, output_dir=str(tmp_path / "a")))
    b = run(fast_cfg(method="adalora", init_r=4, target_r=2, max_steps=3, orth_reg_weight=0.0,
                     output_dir=str(tmp_path / "b")))
    la = [r["loss"] for r in a.log if "loss" in r]
    lb = [r["loss"] for r in b.log if "loss" in r]
    assert la[0] == lb[0] and la[1:] != lb[1:]  # same first task loss; the gradients then differ


@pytest.mark.parametrize("flags,message", [
    (["--method", "adalora", "--max-steps", "5", "--tinit", "3", "--tfinal", "2"], "leave no steps for adalora"),
    (["--method", "prompt-tuning", "--merge"], "no merged model"),
    (["--method", "prompt-tuning", "--prompt-tuning-init", "TEXT"], "needs --prompt-tuning-init-text"),
    (["--method", "adalora", "--resume-from-checkpoint", "latest"], "rerun from the start"),
    (["--method", "dora"], "invalid choice"),
    (["--method", "adaption-prompt", "--adapter-layers", "9"], "adapter_layers=9 but the model has only 2"),
    (["--deltaT", "0"], "--deltaT must be > 0"),
])
def test_bad_method_flags_exit_2_before_any_work(flags, message, tmp_path, tiny_dir, data_file, capsys):
    from train.__main__ import main

    out = tmp_path / "out"
    argv = ["--model", str(tiny_dir), "--dataset", str(data_file), "--output-dir", str(out), *flags]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusal (an unknown choice)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err[-400:]
    assert message in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert not out.exists()
