"""torch.compile over LoRA models: no graph breaks inside our layers, compiled = eager, recompiles
only for new shapes.

Graph breaks are counted with `torch._dynamo.explain` on the loss of a forward (the backward is
AOTAutograd's, traced from the same graph), for ours and for peft's model on the same base: the
counts must be equal (a tiny GPT-2 has breaks of its own in transformers, on both sides) and no
break may come from a frame in lora_core/ or kernels/.
"""
from pathlib import Path

import bitsandbytes
import peft
import pytest
import torch
import torch._dynamo

from adapter_pairs import no_cpu_repack
from lora_core import LoraConfig, get_lora_model
from tiny_models import example_inputs, load_tiny, save_tiny

OURS = tuple(str(Path(__file__).resolve().parents[2] / d) for d in ("lora_core", "kernels"))
PEFT = tuple(str(Path(m.__file__).parent) for m in (peft, bitsandbytes))  # peft's layers call bnb's


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(arch, root / arch) for arch in ("llama", "gpt2")}


def build(side, path, arch, quantization="none", dtype=torch.float32, dropout=0.0, train=True, merged=False,
          checkpointing=False):
    """ours or peft's model with the same LoRA (all-linear, r=4, B != 0), in train or eval mode."""
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=dropout)
    base = load_tiny(path, arch, quantization, dtype)
    torch.manual_seed(0)
    if side == "ours":
        model = get_lora_model(base, LoraConfig(**cfg))
    else:
        model = peft.get_peft_model(no_cpu_repack(base), peft.LoraConfig(**cfg))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if merged:
        model.merge_adapter()
    return model.train(train)


def loss_fn(model, autocast=False):
    def f(**batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(**batch).loss
    return f


def breaks(model, batch, autocast=False, stack=OURS):
    """(graph breaks (explain's reasons), those raised in a frame under `stack` as 'file:line reason'). A break's
    innermost frame is where it happened (its outer frames include LoraModel.forward for every
    break in the wrapped model)."""
    torch._dynamo.reset()
    report = torch._dynamo.explain(loss_fn(model, autocast))(**batch)
    mine = [f"{fr.filename}:{fr.lineno} {str(r.reason).splitlines()[0]}"
            for r in report.break_reasons for fr in r.user_stack[-1:] if fr.filename.startswith(stack)]
    return len(report.break_reasons), mine


# (arch, quantization, dtype, lora_dropout, train, merged, autocast, checkpointing)
MATRIX = {
    "fp32-p0-train": ("llama", "none", torch.float32, 0.0, True, False, False, False),
    "fp32-p05-train": ("llama", "none", torch.float32, 0.05, True, False, False, False),
    "fp32-merged-eval": ("llama", "none", torch.float32, 0.0, False, True, False, False),
    "conv1d-p05-train": ("gpt2", "none", torch.float32, 0.05, True, False, False, False),
    "nf4-p0-train": ("llama", "nf4", torch.bfloat16, 0.0, True, False, False, False),
    "nf4-p05-train": ("llama", "nf4", torch.bfloat16, 0.05, True, False, False, False),
    "nf4-p05-eval": ("llama", "nf4", torch.bfloat16, 0.05, False, False, False, False),
    "nf4-merged-eval": ("llama", "nf4", torch.bfloat16, 0.0, False, True, False, False),
    "fp4-p05-train": ("llama", "fp4", torch.float32, 0.05, True, False, False, False),
    "int8-p05-train": ("llama", "int8", torch.float32, 0.05, True, False, False, False),
    "int8-merged-eval": ("llama", "int8", torch.float32, 0.0, False, True, False, False),
    "fp32-autocast-bf16": ("llama", "none", torch.float32, 0.05, True, False, True, False),
    "nf4-checkpointing": ("llama", "nf4", torch.bfloat16, 0.05, True, False, False, True),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MATRIX))
def test_no_graph_breaks_in_our_layers(model_dirs, case):
    arch, quantization, dtype, p, train, merged, autocast, ckpt = MATRIX[case]
    batch = example_inputs(arch)
    ours, in_ours = breaks(build("ours", model_dirs[arch], arch, quantization, dtype, p, train, merged, ckpt),
                           batch, autocast)
    assert in_ours == [], in_ours
    # the model's own breaks: peft's count less those in peft's layers and the bitsandbytes layers
    # they call (merged int8: peft's layers run bnb's int8 matmul, which breaks)
    theirs, in_peft = breaks(build("peft", model_dirs[arch], arch, quantization, dtype, p, train, merged, ckpt),
                             batch, autocast, stack=PEFT)
    assert ours == theirs - len(in_peft), (ours, theirs, in_peft)


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _run(fn, model, batch, train):
    torch.manual_seed(7)  # the same dropout draws for eager and compiled
    loss = fn(**batch)
    if train:
        loss.backward()
    out = (loss.detach(), _lora_grads(model) if train else {})
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case,tol", [
    # AOTAutograd runs the same aten ops in the same order, dropout draws included: fp32 equal to
    # the last bits (measured 0)
    ("fp32-p05-train", 1e-6),
    # bf16 activations: compiled, the torch backend adds the LoRA term out of place and scales
    # with plain products (kernels/torch_ops.py: Dynamo refuses mark_dirty), other bf16 roundings
    # (2**-8 relative each) than eager's in-place adds, compounded through backward (measured 0 on
    # the loss, <= 2.2e-2 on grads; eager ours vs peft differ by up to 5e-2 on nf4)
    ("nf4-p05-train", 5e-2), ("nf4-checkpointing", 5e-2),
])
def test_compiled_equals_eager_aot(model_dirs, case, tol):
    """torch.compile with AOTAutograd (backend aot_eager): outputs and LoRA gradients equal eager."""
    arch, quantization, dtype, p, train, merged, autocast, ckpt = MATRIX[case]
    model = build("ours", model_dirs[arch], arch, quantization, dtype, p, train, merged, ckpt)
    batch = example_inputs(arch)
    fn = loss_fn(model, autocast)
    torch._dynamo.reset()
    want = _run(fn, model, batch, train)
    # fullgraph: a break anywhere fails (GPT-2 and transformers' checkpointing hooks have their own)
    got = _run(torch.compile(fn, backend="aot_eager", fullgraph=arch == "llama" and not ckpt), model, batch, train)
    _assert_same(got, want, tol)


def _assert_same(got, want, tol):
    assert want[1] and got[1].keys() == want[1].keys()
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=0)
    for name, g in want[1].items():
        err = ((got[1][name] - g).norm() / g.norm().clamp_min(1e-30)).item()
        assert err <= tol, (name, err)


class _Counting:
    """A torch.compile backend that runs the graphs eagerly and counts how many Dynamo made."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("whole,quantization", [(True, "nf4"), (False, "nf4"), (True, "int8")])
def test_new_sequence_length_does_not_recompile(model_dirs, whole, quantization):
    """dynamic=True: a second and third sequence length reuse the graphs, for torch.compile(model)
    and for compiling only the decoder layers (torchtune's pattern)."""
    dtype = torch.bfloat16 if quantization == "nf4" else torch.float32
    model = build("ours", model_dirs["llama"], "llama", quantization, dtype, 0.05, train=True)
    layers = model.base_model.model.layers
    torch._dynamo.reset()
    backend = _Counting()
    if whole:
        run = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)
    else:
        for layer in layers:
            layer.compile(backend=backend, dynamic=True, fullgraph=True)
        run = model
    graphs = []
    for seq in (8, 13, 17):
        run(**example_inputs("llama", seq=seq)).loss.backward()
        graphs.append(backend.graphs)
    n = 1 if whole else len(layers)
    assert graphs == [n, n, n], graphs


@pytest.mark.slow
def test_inductor_decoder_layers_max_autotune_equal_eager(model_dirs):
    """Inductor, mode='max-autotune-no-cudagraphs', on the decoder layers only: loss and LoRA
    gradients of an nf4 Llama (fp32 compute, no dropout: Inductor draws its own random bits) equal
    eager's. Inductor fuses and reorders fp32 sums (measured 0 on the loss, 1e-6 on grads)."""
    model = build("ours", model_dirs["llama"], "llama", "nf4", torch.float32, 0.0, train=True)
    batch = example_inputs("llama")
    fn = loss_fn(model)
    torch._dynamo.reset()
    want = _run(fn, model, batch, True)
    for layer in model.base_model.model.layers:
        layer.compile(mode="max-autotune-no-cudagraphs", fullgraph=True)
    got = _run(fn, model, batch, True)
    _assert_same(got, want, 1e-5)
