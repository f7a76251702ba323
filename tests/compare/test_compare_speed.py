"""`compare speed` runs on CPU and prints a table with ratios to peft (no timing assertions),
memory per variant, and on request the memory breakdown and a PNG."""
import json

import pytest

from compare.__main__ import main

PNG = b"\x89PNG\r\n\x1a\n"


def test_speed_cpu_table_and_json(tmp_path, capsys):
    out, png = tmp_path / "speed.json", tmp_path / "pics" / "speed.png"
    assert main(["speed", "--steps", "2", "--warmup", "1", "--seq", "8", "--json", str(out),
                 "--memory-breakdown", "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    for word in ("ours-torch", "peft", "ratio", "optimizer step", "tokens/s", "skipped", "step MiB",
                 "saved/LoRA layer KiB", "live at the peak, by kind", "saved activations MiB", "q_proj"):
        assert word in printed, printed
    data = json.loads(out.read_text())
    by_name = {v["name"]: v for v in data["variants"]}
    assert by_name["peft"]["optimizer step"]["ratio_to_peft"] == 1.0
    ours = by_name["ours-torch"]
    for phase in ("forward", "forward+backward", "optimizer step"):
        assert ours[phase]["median_s"] > 0 and ours[phase]["ratio_to_peft"] > 0
    assert ours["tokens_per_s"] > 0
    for v in (ours, by_name["peft"]):
        mem = v["memory"]
        assert 0 < mem["start_bytes"] < mem["peak_bytes"] == sum(mem["breakdown_bytes"].values())
        assert mem["breakdown_bytes"]["weights"] > 0 and mem["saved_bytes"] > 0
        assert len(mem["saved_per_layer_bytes"]) == 4  # q_proj, v_proj in 2 layers
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10000
    assert [p.name for p in png.parent.iterdir()] == ["speed.png"]  # no temp file left
    # Without CUDA the triton row is listed as skipped, with the reason.
    import torch

    if not torch.cuda.is_available():
        assert "interpreter" in by_name["ours-triton"]["skipped"]
    # what ran is printed and saved: backend and strategy per pass, with the layer shapes
    ran = {(g["backend"], g["pass"], g["strategy"]) for g in data["backends"]}
    assert ("torch", "forward", "torch") in ran and "ran: torch backend, forward -> torch" in printed
    assert all(g["calls"] > 0 and g["shapes"] for g in data["backends"])


def test_speed_lora_dropout_reaches_both_sides():
    """--lora-dropout sets the same LoRA dropout on ours and peft's: in train mode two forwards of
    either side differ (the base model's own dropouts stay off, so nothing else could)."""
    import torch

    from compare.equivalence import no_dropout
    from compare.models import ModelSpec, build_pair, example_batch
    from compare.speed import set_lora_dropout

    spec = ModelSpec(seq=8)
    pair = build_pair(spec)
    batch = example_batch(pair.ours.base_model, spec, seed=1)
    for model in (pair.ours, pair.peft):
        no_dropout(model)
        model.train()
    with torch.no_grad():
        same = [torch.equal(m(**batch).logits, m(**batch).logits) for m in (pair.ours, pair.peft)]
        assert same == [True, True]  # all dropout off: deterministic
        set_lora_dropout(pair.keymap, 0.3)
        differ = [not torch.equal(m(**batch).logits, m(**batch).logits) for m in (pair.ours, pair.peft)]
    assert differ == [True, True], differ


@pytest.mark.parametrize("plot, expect", [("speed.txt", "give a path ending in .png"),
                                          (".", "is a directory")])
def test_speed_bad_plot_path(tmp_path, capsys, plot, expect):
    """A --plot that cannot be a PNG is refused in one line, before any model is built."""
    target = tmp_path / plot
    if plot == ".":
        target = tmp_path / "dir.png"
        target.mkdir()
    assert main(["speed", "--steps", "1", "--plot", str(target)]) == 2
    err = capsys.readouterr().err
    assert expect in err and "building" not in err, err
    assert err.count("error:") == 1


@pytest.mark.slow
def test_speed_compile_table_and_json(tmp_path, capsys):
    """--compile: both sides run compiled; each reports its compile time; memory is not measured."""
    out = tmp_path / "speed.json"
    assert main(["speed", "--steps", "2", "--warmup", "1", "--seq", "8", "--compile", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "torch.compile(model, mode='default') on every side" in printed, printed
    assert "compile time" in printed and "memory: not measured with --compile" in printed, printed
    by_name = {v["name"]: v for v in json.loads(out.read_text())["variants"]}
    for name in ("ours-torch", "peft"):
        assert by_name[name]["compile_s"] > 0 and by_name[name]["memory"] is None
        assert by_name[name]["optimizer step"]["median_s"] > 0


@pytest.mark.parametrize("argv, expect", [
    (["--compile", "--memory-breakdown"], "--memory-breakdown show memory"),
    (["--compile-mode", "max-autotune"], "--compile-mode max-autotune needs --compile"),
])
def test_speed_compile_bad_combinations(capsys, argv, expect):
    assert main(["speed", "--steps", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert expect in err and "building" not in err, err
    assert err.count("error:") == 1
