"""compare.memory: the step's peak memory is exact on a layer we can count by hand, does not depend on
the order the variants run in, and doubles with the batch; our LoRA layers save less than peft's
for backward when dropout is on."""
from types import SimpleNamespace

import pytest
import torch

from compare.memory import CATEGORIES, measure_step
from compare.models import ModelSpec
from compare.speed import run_speed

F32 = 4  # bytes per fp32 element


class OneLayer(torch.nn.Module):
    """A LoraLinear on a dense base with a loss, called like a transformers model: model(x=...).loss."""

    def __init__(self, k: int, n: int, r: int):
        super().__init__()
        from lora_core import LoraLinear

        self.layer = LoraLinear(torch.nn.Linear(k, n), r=r, lora_alpha=2 * r, backend="torch")
        self.layer.base_layer.requires_grad_(False)
        torch.nn.init.normal_(self.layer.lora_B["default"].weight)

    def forward(self, x):
        return SimpleNamespace(loss=self.layer(x).square().sum())


def test_one_layer_counted_by_hand():
    m, k, n, r = 96, 64, 128, 4
    model = OneLayer(k, n, r)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = {"x": torch.randn(m, k)}
    model(**batch).loss.backward()
    opt.step()  # AdamW's state exists from here on, as after the timed repetitions
    mem = measure_step(model, opt, batch, {"layer": model.layer})

    lora = (r * k + n * r) * F32
    assert mem.breakdown["weights"] == (n * k + n) * F32 + lora
    assert mem.breakdown["optimizer state"] == 2 * lora + 2 * F32  # exp_avg, exp_avg_sq; 2 fp32 `step`s
    # The layer's graph keeps x [M, K] and u [M, r] (W, A and B are weights, saved by reference);
    # the loss's square() keeps y [M, N] outside the layer.
    assert mem.saved_per_layer == {"layer": (m * k + m * r) * F32}
    assert mem.saved_bytes == (m * k + m * r + m * n) * F32
    assert mem.start_bytes == mem.breakdown["weights"] + mem.breakdown["optimizer state"] + m * k * F32
    assert sum(mem.breakdown.values()) == mem.peak_bytes and set(mem.breakdown) == set(CATEGORIES)
    # Above the start: at least y and u, which are alive together before backward frees them.
    assert mem.step_bytes >= (m * n + m * r) * F32
    assert mem.peak_phase in ("forward", "backward", "optimizer step")


SPEC = dict(model="tiny", quantization="nf4", seq=64, r=8)


@pytest.fixture(scope="module")
def runs():
    """Three short `compare speed` runs on an nf4 base with LoRA dropout: both variant orders at
    batch 2, and batch 4. One timed repetition each: only the memory figures are used."""
    def run(batch, variants):
        result = run_speed(ModelSpec(batch=batch, **SPEC), steps=1, warmup=1, lora_dropout=0.05,
                           variants=variants)
        return {v["name"]: v["memory"] for v in result["variants"] if not v["skipped"]}

    torch.set_num_threads(1)
    return {"ours first": run(2, ["ours-torch", "peft"]), "peft first": run(2, ["peft", "ours-torch"]),
            "double batch": run(4, ["ours-torch", "peft"])}


@pytest.mark.parametrize("name", ["ours-torch", "peft"])
def test_memory_same_whatever_runs_first(runs, name):
    a, b = runs["ours first"][name], runs["peft first"][name]
    for key in ("peak_bytes", "step_bytes", "saved_bytes"):
        assert a[key] == pytest.approx(b[key], rel=0.10), (key, a, b)
    assert a["step_bytes"] > 0 and a["saved_bytes"] > 0


@pytest.mark.parametrize("name", ["ours-torch", "peft"])
def test_memory_grows_with_the_batch(runs, name):
    one, two = runs["ours first"][name], runs["double batch"][name]
    # Weights and optimizer state do not depend on the batch; the batch itself is 2 int64 [B, S].
    assert two["start_bytes"] - one["start_bytes"] == 2 * 2 * SPEC["seq"] * 8
    # Every activation is [batch, seq, ...]: what a LoRA layer saves doubles exactly, the step's
    # working set nearly (the LoRA gradients, a few KiB, do not grow).
    for path, n in one["saved_per_layer_bytes"].items():
        assert two["saved_per_layer_bytes"][path] == 2 * n, path
    assert 1.8 < two["step_bytes"] / one["step_bytes"] < 2.1, (one, two)
    assert 1.9 < two["saved_bytes"] / one["saved_bytes"] < 2.05, (one, two)


def test_ours_saves_less_than_peft_with_dropout(runs):
    """With dropout both sides keep dropout(x) [M, K] and u [M, r]. Where x needs grad (past the
    first decoder layer, whose input is the frozen embedding's) dropout's backward needs its mask
    too: peft's F.dropout keeps it as the fp32 `noise` [M, K], ours as a bool [M, K] (the same draw
    and bits: kernels/torch_ops.PeftDropoutFunction)."""
    ours, peft = runs["ours first"]["ours-torch"], runs["ours first"]["peft"]
    m, k, r = 2 * SPEC["seq"], 128, SPEC["r"]  # the tiny default: hidden 128
    for path, n in ours["saved_per_layer_bytes"].items():
        first = path.startswith("model.layers.0.")
        assert n == (m * k + m * r) * F32 + (0 if first else m * k), path  # xd, u (+ bool mask)
        theirs = peft["saved_per_layer_bytes"][path]
        assert theirs == (m * k + m * r + (0 if first else m * k)) * F32, path  # xd, u (+ fp32 noise)
    assert sum(ours["saved_per_layer_bytes"].values()) < sum(peft["saved_per_layer_bytes"].values())
    assert ours["saved_bytes"] < peft["saved_bytes"]
