"""`python -m train.generate` (issue 14): load an adapter on its base and complete a prompt; the
base alone with --no-adapter; bad input is one error line and exit 2 before any model loads."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import transformers

from lora_core import LoraConfig, LoraModel, get_lora_model
from train.generate import main
from train.models import build_char_tokenizer

PROMPT = "The river keeps the clock. ->: "


def _run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory):
    """A non-trivial adapter on the tiny Llama (B perturbed) saved with the char tokenizer; its
    config names tiny_dir as the base."""
    model = get_lora_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(target_modules="all-linear", r=4, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if p.requires_grad):
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("gen") / "adapter"
    model.save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return path


def _by_hand(tiny_dir, adapter_dir, use_adapter: bool) -> str:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    if use_adapter:
        model = LoraModel.from_pretrained(model, adapter_dir)
    tok = build_char_tokenizer()
    enc = tok(PROMPT, return_tensors="pt")
    out = model.eval().generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_completion_with_and_without_the_adapter(tiny_dir, adapter):
    rc, out, err = _run(["--adapter", adapter, "--prompt", PROMPT, "--max-new-tokens", 12])
    assert rc == 0, err
    rc0, base_out, _ = _run(["--adapter", adapter, "--prompt", PROMPT, "--max-new-tokens", 12, "--no-adapter"])
    assert rc0 == 0
    assert out == _by_hand(tiny_dir, adapter, True) + "\n"  # the base its config names
    assert base_out == _by_hand(tiny_dir, adapter, False) + "\n"
    assert out != base_out  # the adapter changes the completion


def test_bad_input_is_one_error_line_before_loading(adapter, tmp_path, monkeypatch):
    import train.models

    monkeypatch.setattr(train.models, "load_base_model", lambda *a, **k: pytest.fail("model loaded"))
    cases = [
        (["--adapter", tmp_path / "missing", "--prompt", "x"], "does not exist"),
        (["--adapter", adapter, "--prompt", "  "], "--prompt is empty"),
        (["--adapter", adapter, "--prompt", "x", "--max-new-tokens", 0], "--max-new-tokens must be > 0"),
        (["--adapter", adapter, "--prompt", "x", "--model", tmp_path / "nowhere"], "no such local directory"),
    ]
    untyped = tmp_path / "untyped"
    untyped.mkdir()
    (untyped / "adapter_config.json").write_text(json.dumps(LoraConfig(target_modules=["q_proj"]).to_dict()))
    cases.append((["--adapter", untyped, "--prompt", "x"], "does not name its base model; pass --model"))
    for argv, expected in cases:
        rc, out, err = _run(argv)
        assert rc == 2 and out == "", (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (argv, err)
