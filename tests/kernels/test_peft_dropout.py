"""The torch backend draws peft's dropout: same adapter file + same torch.manual_seed -> the same
masks as peft's nn.Dropout, so loss, every LoRA gradient and an AdamW trajectory equal peft's
bit for bit on CPU, in fp32 and on an nf4 base (fp32 compute), with lora_dropout on.

Exact equality (no tolerance) holds because every op is the same op on the same tensors in the same
order: bitsandbytes' dequantization (bnb's own kernel on both sides), F.dropout on the fp32 input,
the two thin F.linear calls, the scale and the add; a power-of-two scaling (alpha = 2r here) is
applied to the thin products instead of g, which changes no bit (kernels/torch_ops.py).
"""
from __future__ import annotations

import pytest
import torch

import peft
from lora_core import LoraModel
from tiny_models import example_inputs, load_tiny, save_tiny

P = 0.1
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A tiny Llama and a peft adapter file with random A and B (B != 0) on every linear layer."""
    root = tmp_path_factory.mktemp("peft_dropout")
    base_dir = save_tiny("llama", root / "llama")
    model = peft.get_peft_model(load_tiny(base_dir, "llama"),
                                peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=P, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(root / "adapter")
    return base_dir, root / "adapter"


def _pair(adapter, quantization):
    base_dir, adapter_dir = adapter
    ours = LoraModel.from_pretrained(load_tiny(base_dir, "llama", quantization), adapter_dir, is_trainable=True)
    ours.set_backend("torch")
    theirs = peft.PeftModel.from_pretrained(load_tiny(base_dir, "llama", quantization), adapter_dir,
                                            is_trainable=True)
    for m in (ours, theirs):
        m.train()
    return ours, theirs


def _lora_params(model) -> dict:
    """{module path: tensor} of every lora_A / lora_B weight, under one naming for both sides."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = name.replace("base_model.model.", "").replace(".adapters.default", "").replace(".default", "")
            out[key.split("model.", 1)[-1]] = p
    return out


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_loss_grads_and_adamw_trajectory_equal_peft_exactly(adapter, quantization):
    ours, theirs = _pair(adapter, quantization)
    params = {"ours": _lora_params(ours), "peft": _lora_params(theirs)}
    assert params["ours"].keys() == params["peft"].keys() and len(params["ours"]) == 2 * 2 * len(TARGETS)
    assert all(m.lora_dropout["default"].p == P for m in ours.lora_layers().values())

    # one pass: loss and every gradient
    batch = example_inputs("llama", batch=2, seq=16)
    losses = {}
    for side, model in (("ours", ours), ("peft", theirs)):
        torch.manual_seed(1234)
        loss = model(**batch).loss
        loss.backward()
        losses[side] = loss.detach()
    assert torch.equal(losses["ours"], losses["peft"])
    for name, p in params["ours"].items():
        assert torch.equal(p.grad, params["peft"][name].grad), name
    # the masks really are drawn: another seed gives another loss
    torch.manual_seed(4321)
    assert not torch.equal(ours(**batch).loss.detach(), losses["ours"])

    # a short AdamW trajectory from the same seed
    traj = {}
    for side, model in (("ours", ours), ("peft", theirs)):
        opt = torch.optim.AdamW(params[side].values(), lr=1e-2, weight_decay=0.01)
        torch.manual_seed(99)
        seq = []
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            loss = model(**example_inputs("llama", batch=2, seq=16, seed=10 + step)).loss
            loss.backward()
            opt.step()
            seq.append(loss.detach())
        traj[side] = torch.stack(seq)
    assert torch.equal(traj["ours"], traj["peft"]), (traj["ours"] - traj["peft"]).abs().max()
    for name, p in params["ours"].items():
        assert torch.equal(p, params["peft"][name]), name


def test_off_cpu_the_mask_is_f_dropouts_own():
    """Off the CPU (CUDA's fused native_dropout draws its own mask and keeps it as bools), the
    torch backend calls F.dropout itself, so its draw stays peft's there too: on the meta device
    (no GPU here) the graph node is F.dropout's, not the CPU Function's."""
    import torch.nn.functional as F

    from kernels.torch_ops import dropout_input

    x = torch.empty(4, 8, device="meta", requires_grad=True)
    ours = dropout_input(x, None, torch.float32, P, None).grad_fn
    assert type(ours) is type(F.dropout(x, P, training=True).grad_fn)
    assert "PeftDropout" not in type(ours).__name__
    cpu = dropout_input(torch.ones(4, 8, requires_grad=True), None, torch.float32, P, None).grad_fn
    assert "PeftDropout" in type(cpu).__name__
