"""Loading the same base twice and putting the same LoRA weights into ours and peft's.

Everything compare measures starts here: `ModelSpec` says which checkpoint, quantization, dtype,
rank and targets; `build_pair` loads the checkpoint twice (once for us, once for peft, so neither
can disturb the other's weights: bitsandbytes repacks 4-bit weights in place on CPU), wraps one
with `lora_core` and one with `peft`, and copies identical LoRA weights in by an explicit key map.
"""
from __future__ import annotations

import atexit
import functools
import importlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
KERNELS = ("torch", "triton")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CompareError(Exception):
    """Bad input or an environment that cannot run the comparison; the message says how to fix it."""


@dataclass
class ModelSpec:
    """Which base model and LoRA configuration both sides are built from."""

    model: str = "tiny"            # "tiny" | local directory | hub id
    quantization: str = "none"     # none | nf4 (double quant) | fp4 | int8
    dtype: str = "float32"         # base compute dtype; LoRA weights stay fp32 on both sides
    r: int = 8
    lora_alpha: int = 16
    target_modules: Optional[list[str] | str] = None  # None = the per-architecture default
    kernel: str = "torch"          # our backend; peft has only its own
    batch: int = 2
    seq: int = 16
    seed: int = 0

    def validate(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise CompareError(f"unknown quantization {self.quantization!r}; valid: {', '.join(QUANTIZATIONS)}")
        if self.kernel not in KERNELS:
            raise CompareError(f"unknown kernel {self.kernel!r}; valid: {', '.join(KERNELS)}")
        if self.dtype not in DTYPES:
            raise CompareError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        if self.r <= 0:
            raise CompareError(f"r must be a positive integer, got {self.r}")
        if self.batch <= 0 or self.seq <= 1:
            raise CompareError(f"need batch >= 1 and seq >= 2, got batch={self.batch} seq={self.seq}")
        check_kernel_available(self.kernel)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def check_kernel_available(kernel: str) -> None:
    """Raise CompareError when `kernel` cannot run on this machine (before any model is built)."""
    import os

    if kernel != "triton":
        return
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise CompareError(f"kernel 'triton' needs the triton package ({e}); use --kernel torch") from None
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise CompareError(
            "kernel 'triton' needs a CUDA GPU, or Triton's interpreter on CPU (set TRITON_INTERPRET=1 "
            "before triton is imported; `python -m compare` does this itself); use --kernel torch")


# ---------------------------------------------------------------------------------------------
# Base models


def _tiny_from_train(path: Path) -> Optional[str]:
    """Save train's embedded default model to `path`; None when the train package has none yet."""
    try:
        tm = importlib.import_module("train.models")
    except Exception:
        return None
    for name in ("save_builtin", "save_tiny_model", "save_default_model"):
        fn = getattr(tm, name, None)
        if callable(fn):
            fn(path)
            return f"train.models.{name}"
    for name in ("build_tiny_model", "tiny_model", "build_default_model", "default_model"):
        fn = getattr(tm, name, None)
        if callable(fn):
            out = fn()
            model = out[0] if isinstance(out, tuple) else out
            model.save_pretrained(path)
            return f"train.models.{name}"
    return None


def _tiny_fallback(path: Path) -> str:
    """A tiny Llama from a config (hidden 64, 2 layers, vocab 256), weights from a fixed seed."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return "compare.models fallback tiny Llama"


@functools.lru_cache(maxsize=1)
def tiny_checkpoint() -> tuple[str, str]:
    """(directory, source) of the tiny default, saved once per process so both sides load it alike."""
    path = Path(tempfile.mkdtemp(prefix="compare-tiny-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    source = _tiny_from_train(path) or _tiny_fallback(path)
    return str(path), source


def resolve_model(model: str) -> str:
    """The checkpoint path or hub id to pass to from_pretrained ("tiny" -> the saved tiny default)."""
    return tiny_checkpoint()[0] if model == "tiny" else model


def load_base(spec: ModelSpec):
    """Load the base model from its checkpoint, quantized as asked, in eval mode.

    Called once per side: the two loads of the same checkpoint give bit-identical weights
    (bitsandbytes quantization is deterministic), and each side owns its own storage.
    """
    import transformers

    name = resolve_model(spec.model)
    dtype = spec.torch_dtype
    kwargs: dict = {"dtype": dtype}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}  # bitsandbytes quantizes on the GPU when it lands there
    if spec.quantization in ("nf4", "fp4"):
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=spec.quantization,
            bnb_4bit_use_double_quant=(spec.quantization == "nf4"), bnb_4bit_compute_dtype=dtype)
    elif spec.quantization == "int8":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
    try:
        config = transformers.AutoConfig.from_pretrained(name)
        auto = (transformers.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False)
                else transformers.AutoModelForCausalLM)
        model = auto.from_pretrained(name, **kwargs)
    except Exception as e:  # hub errors, missing files, bad configs all land here
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompareError(
            f"cannot load model {spec.model!r} ({type(e).__name__}: {msg}); pass a local directory "
            f"holding config.json and weights, a hub id reachable from here, or 'tiny'") from None
    model.eval()
    return model


def example_batch(model, spec: ModelSpec, seed: int = 1) -> dict:
    """Random token ids (labels = inputs) of shape [batch, seq] within the model's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    vocab = min(int(model.config.vocab_size), 32000)
    ids = torch.randint(1, vocab, (spec.batch, spec.seq), generator=g).to(model.device)
    return {"input_ids": ids, "labels": ids.clone()}


# ---------------------------------------------------------------------------------------------
# ours + peft with the same LoRA weights


@dataclass
class Pair:
    """Ours and peft's LoRA models on the same base, plus the key map between their LoRA layers.

    keymap: {module path inside the HF model: (our LoraLinear, peft's lora.LoraLayer)}.
    """

    ours: object
    peft: object
    keymap: dict = field(default_factory=dict)


def our_config(spec: ModelSpec):
    import lora_core

    return lora_core.LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                                target_modules=spec.target_modules)


def peft_config(spec: ModelSpec):
    import peft

    return peft.LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                           target_modules=spec.target_modules)


def peft_lora_layers(peft_model) -> dict:
    """{module path inside the HF model: peft LoraLayer} for every LoRA-wrapped module."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model
    return {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}


def make_keymap(ours, peft_model, adapter: str = "default") -> dict:
    """Match the layers holding `adapter` by module path; a mismatch is an error naming the paths
    on each side."""
    mine = {p: m for p, m in ours.lora_layers().items() if adapter in m.adapters}
    theirs = {p: m for p, m in peft_lora_layers(peft_model).items() if adapter in m.lora_A}
    if set(mine) != set(theirs):
        only_ours = sorted(set(mine) - set(theirs))
        only_peft = sorted(set(theirs) - set(mine))
        raise CompareError(
            "ours and peft wrap different layers for the same target_modules: "
            f"only ours: {only_ours[:8]}{' ...' if len(only_ours) > 8 else ''}; "
            f"only peft: {only_peft[:8]}{' ...' if len(only_peft) > 8 else ''}")
    return {k: (mine[k], theirs[k]) for k in sorted(mine)}


def lora_weights(layer, adapter: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) of one adapter of a LoRA layer: ours and peft's read alike."""
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


@torch.no_grad()
def seed_lora_weights(keymap: dict, seed: int, adapter: str = "default") -> None:
    """Give every pair the same A and B from a fixed seed; B is non-zero so the LoRA branch matters.

    A [r, in] ~ U(-1/sqrt(in), 1/sqrt(in)) (the scale of nn.Linear's default init);
    B [out, r] ~ N(0, 0.02^2): big enough that a wrong scaling shows, small enough to stay stable.
    """
    g = torch.Generator().manual_seed(seed)
    for path, (mine, theirs) in keymap.items():
        a, b = lora_weights(mine, adapter)
        bound = 1.0 / a.shape[1] ** 0.5
        a_val = (torch.rand(a.shape, generator=g, dtype=torch.float32) * 2 - 1) * bound
        b_val = torch.randn(b.shape, generator=g, dtype=torch.float32) * 0.02
        copy_lora(mine, theirs, a_val, b_val, adapter)


@torch.no_grad()
def copy_lora(mine, theirs, a_val: torch.Tensor, b_val: torch.Tensor, adapter: str = "default") -> None:
    """Write A [r, in] and B [out, r] into one adapter of our layer and of peft's."""
    (ma, mb), (pa, pb) = lora_weights(mine, adapter), lora_weights(theirs, adapter)
    for dst, src in ((ma, a_val), (mb, b_val), (pa, a_val), (pb, b_val)):
        if dst.shape != src.shape:
            raise CompareError(f"LoRA weight shape mismatch: {tuple(dst.shape)} vs {tuple(src.shape)}")
        dst.copy_(src.to(dst.dtype))


def lora_state(keymap: dict) -> dict:
    """{path: (A, B)} cloned from our layers: the weights to carry into a fresh pair."""
    return {p: tuple(t.detach().float().clone() for t in lora_weights(m)) for p, (m, _) in keymap.items()}


def build_pair(spec: ModelSpec, lora_weights: Optional[dict] = None) -> Pair:
    """Load the base twice, wrap with ours and peft, and give both the same LoRA weights.

    lora_weights: {path: (A, B)} to copy in; None = seeded non-zero weights (`seed_lora_weights`).
    """
    import lora_core
    import peft

    base_ours, base_peft = load_base(spec), load_base(spec)
    try:
        torch.manual_seed(spec.seed)
        ours = lora_core.get_lora_model(base_ours, our_config(spec))
        ours.set_kernel(spec.kernel)
    except ValueError as e:  # lora_core's config/injection errors name the problem and the fix
        raise CompareError(f"lora_core refused this configuration: {e}") from None
    try:
        torch.manual_seed(spec.seed)
        theirs = peft.get_peft_model(base_peft, peft_config(spec))
    except ValueError as e:
        raise CompareError(f"peft refused this configuration: {e}") from None
    keymap = make_keymap(ours, theirs)
    if lora_weights is None:
        seed_lora_weights(keymap, spec.seed)
    else:
        for p, (m, t) in keymap.items():
            copy_lora(m, t, *lora_weights[p])
    return Pair(ours, theirs, keymap)


def lora_params(model) -> list[torch.nn.Parameter]:
    """The trainable parameters (LoRA A and B here), in a fixed order, for an optimizer."""
    return [p for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]) if p.requires_grad]
