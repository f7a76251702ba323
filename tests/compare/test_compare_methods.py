"""`compare equivalence --method ...` (the other PEFT methods against peft) and `method` as a sweep
grid key."""
import json

import pytest
import torch

import compare
from compare.__main__ import main
from compare.methods import run_method_equivalence
from compare.models import ModelSpec

EXPECTED = ["same seed -> same initial tensors", "trainable parameters", "forward logits (train mode)",
            "forward logits (inference", "gradients of every trainable tensor", "training trajectory",
            "our adapter file -> peft", "peft adapter file -> ours"]


@pytest.mark.slow
def test_adalora_cli_passes_with_its_allocation_rows(tmp_path, capsys):
    out = tmp_path / "eq.json"
    assert main(["equivalence", "--method", "adalora", "--seq", "8", "--steps", "3", "--r", "4",
                 "--json", str(out)]) == 0, capsys.readouterr().out
    report = json.loads(out.read_text())
    checks = [r["check"] for r in report["rows"]]
    for prefix in EXPECTED + ["final rank pattern"]:
        assert any(c.startswith(prefix) for c in checks), checks
    assert all(r["ok"] for r in report["rows"])
    assert report["info"]["method"] == "adalora"


@pytest.mark.slow
def test_a_broken_ia3_scale_fails_the_rows_that_see_it():
    """One of our IA3 scales doubled (peft's kept): forward, gradient, trajectory, file and merge rows
    fail; the counts and the initial draws (checked before the tamper) still pass."""
    def tamper(pair):
        name = sorted(pair.keymap)[-1]
        with torch.no_grad():
            pair.keymap[name][0].mul_(2.0)

    report = run_method_equivalence(ModelSpec(model="tiny", seq=8), "ia3", steps=2, tamper=tamper)
    failed = report.failed()
    assert report.row("trainable parameters").ok and report.row("same seed").ok
    for prefix in ("forward logits (train mode)", "gradients", "training trajectory", "peft adapter file -> ours",
                   "merged outputs"):
        assert any(f.startswith(prefix) for f in failed), report.format()


def test_method_is_a_sweep_grid_key(tmp_path, monkeypatch):
    """--grid method=lora,ia3 runs one training per method; a method train refuses is refused first."""
    import types

    import train

    calls = []

    def fake(cfg):
        calls.append(cfg.method)
        return types.SimpleNamespace(before={"eval_loss": 5.0}, after={"eval_loss": 4.0, "tag_exact_match": None},
                                     log=[{"loss": 4.5, "tokens_per_s": 100.0}], steps=2, train_seconds=0.2)

    monkeypatch.setattr(train, "run", fake)
    rows = compare.sweep({"max_steps": 2}, {"method": ["lora", "ia3", "prompt-tuning"]}, out_dir=tmp_path / "sw")
    assert calls == ["lora", "ia3", "prompt-tuning"] and [r["method"] for r in rows] == calls
    assert main(["sweep", "--grid", "method=lora,dora", "--out", str(tmp_path / "bad")]) == 2
