"""`compare equivalence` on the tiny default: passes for every quantization, fails when a layer is wrong."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compare.__main__ import main
from compare.equivalence import run_equivalence
from compare.models import ModelSpec

ROOT = Path(__file__).resolve().parents[2]
# Rows every run must produce (prefixes of Row.check), so a check that silently vanished fails here.
EXPECTED = ["trainable parameters", "init ", "forward logits (train mode)", "forward logits (inference",
            "gradients of every A and B", "training trajectory", "our adapter file -> peft",
            "peft adapter file -> ours", "merged weights", "merged outputs", "second adapter",
            "mixed batch"]


@pytest.mark.parametrize("quantization", ["none", "nf4", "fp4", "int8"])
def test_equivalence_passes_on_tiny_default(quantization):
    report = run_equivalence(ModelSpec(model="tiny", quantization=quantization, seq=8), steps=3)
    text = report.format()
    assert report.ok, text
    for prefix in EXPECTED + ["training trajectory, lora_dropout"]:  # torch backend: peft's dropout masks
        assert report.row(prefix).ok, text
    # The LoRA weights were non-zero, so the comparison compared something: B != 0 moves the logits.
    assert report.info["lora_layers"] > 0
    assert "RESULT: PASS" in text


@pytest.mark.parametrize("variant", [
    dict(use_dora=True),
    dict(use_dora=True, init_lora_weights="pissa_niter_2"),
    dict(init_lora_weights="olora", quantization="nf4"),
    dict(init_lora_weights="orthogonal", use_rslora=True),
    dict(lora_bias=True, init_lora_weights="false"),  # Llama's layers have no bias: both refuse to merge
], ids=["dora", "dora-pissa_niter", "olora-nf4", "orthogonal-rslora", "lora_bias"])
def test_equivalence_passes_for_the_variants(variant):
    """Issue 13: `compare equivalence --use-dora` and the other axes pass, every row."""
    report = run_equivalence(ModelSpec(model="tiny", seq=8, **variant), steps=2)
    text = report.format()
    assert report.ok, text
    for prefix in EXPECTED:
        assert report.row(prefix).ok, text
    if variant.get("use_dora"):
        assert "lora_magnitude_vector" in report.row("gradients").check


@pytest.mark.parametrize("args, match", [
    (["--quantization", "nf4", "--init-lora-weights", "pissa"], "peft's PiSSA refuses quantized bases"),
    (["--quantization", "int8", "--use-dora"], "peft's DoRA on an int8 base fails on CPU"),
    (["--init-lora-weights", "orthogonal", "--r", "5"], "needs an even rank"),
    (["--use-dora", "--lora-bias"], "lora_bias=True is not supported with use_dora"),
    (["--init-lora-weights", "corda"], "init_lora_weights='corda': not supported"),
])
def test_variant_combinations_peft_or_we_refuse_fail_before_any_work(args, match, capsys):
    if "int8" in args and __import__("torch").cuda.is_available():
        pytest.skip("peft's int8 DoRA problem is CPU-only")
    assert main(["equivalence", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err, err


def _tamper_factory(victim: dict):
    def tamper(pair):
        path = sorted(pair.keymap)[-1]
        victim["path"] = path
        pair.keymap[path][0].adapters["default"].scaling *= 2  # our layer only: peft keeps the right scaling
    return tamper


def test_broken_layer_fails_with_the_right_rows(monkeypatch, tmp_path, capsys):
    """A doubled scaling on ONE of our layers: the CLI exits 1, and the rows that depend on that
    layer fail (gradients naming it), while the rows that cannot see it still pass."""
    import compare.equivalence as eq

    victim = {}
    real_build = eq.build_pair
    tamper = _tamper_factory(victim)

    def broken_build(spec, weights=None, **kw):
        pair = real_build(spec, weights, **kw)
        tamper(pair)
        return pair

    monkeypatch.setattr(eq, "build_pair", broken_build)
    out = tmp_path / "eq.json"
    rc = main(["equivalence", "--seq", "8", "--steps", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 1, printed
    data = json.loads(out.read_text())
    rows = {r["check"].split(" (")[0]: r for r in data["rows"]}
    assert not data["ok"]
    assert rows["forward logits"]["verdict"] == "FAIL"
    grads = next(r for r in data["rows"] if r["check"].startswith("gradients"))
    assert grads["verdict"] == "FAIL"
    assert grads["where"].startswith(victim["path"] + "."), grads  # the worst layer is the broken one
    assert rows["merged weights"]["verdict"] == "FAIL"
    assert rows["trainable parameters"]["verdict"] == "PASS"
    # peft's file loaded by a fresh (untampered) LoraModel: nothing wrong there.
    assert next(r for r in data["rows"] if r["check"] == "peft adapter file -> ours")["verdict"] == "PASS"
    assert "RESULT: FAIL" in printed and "gradients of every A and B" in printed


def test_equivalence_triton_interpreter_nf4(tmp_path):
    """Our triton backend (Triton's interpreter on CPU) against peft on an nf4 base, bf16 activations."""
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "eq.json"
    cmd = [sys.executable, "-m", "compare", "equivalence", "--backend", "triton", "--quantization", "nf4",
           "--batch", "1", "--seq", "8", "--steps", "2", "--json", str(out)]
    # One torch thread, as in the rest of this directory (see conftest.py).
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 2 and ("kernels.lora_" in proc.stderr and ("No module named" in proc.stderr
                                                                      or "is not available" in proc.stderr)):
        pytest.skip(f"the Triton ops are not in this checkout yet: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["ok"] and data["spec"]["backend"] == "triton" and data["spec"]["dtype"] == "bfloat16"
    assert len(data["rows"]) == len(EXPECTED)
