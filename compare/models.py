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
BACKENDS = ("torch", "triton")
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
    backend: str = "torch"         # our backend; peft has only its own
    batch: int = 2
    seq: int = 16
    seed: int = 0
    # LoRA variants, peft's LoraConfig fields (init_lora_weights as on a command line: "true", "false",
    # "gaussian", "orthogonal", "pissa", "pissa_niter_<N>", "olora", "loftq")
    use_dora: bool = False
    use_rslora: bool = False
    lora_bias: bool = False
    init_lora_weights: str = "true"

    def variant_kwargs(self) -> dict:
        """The variant fields as both LoraConfigs take them."""
        init = {"true": True, "false": False}.get(str(self.init_lora_weights).lower(), self.init_lora_weights)
        out = {"use_dora": self.use_dora, "use_rslora": self.use_rslora, "lora_bias": self.lora_bias,
               "init_lora_weights": init}
        if init == "loftq":
            out["loftq_config"] = {"loftq_bits": 4, "loftq_iter": 1}
        return out

    def validate(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise CompareError(f"unknown quantization {self.quantization!r}; valid: {', '.join(QUANTIZATIONS)}")
        if self.backend not in BACKENDS:
            raise CompareError(f"unknown backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise CompareError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        if self.r <= 0:
            raise CompareError(f"r must be a positive integer, got {self.r}")
        if self.batch <= 0 or self.seq <= 1:
            raise CompareError(f"need batch >= 1 and seq >= 2, got batch={self.batch} seq={self.seq}")
        check_backend_available(self.backend)
        import lora_core

        try:  # the variant rules (lora_bias with init true/false and without DoRA, even r, ...)
            lora_core.LoraConfig(r=self.r, **self.variant_kwargs())
        except ValueError as e:
            raise CompareError(f"lora_core refused this configuration: {str(e).splitlines()[0]}") from None
        peft_cannot = self.peft_limitation()
        if peft_cannot:
            raise CompareError(f"nothing to compare with: {peft_cannot}")

    def peft_limitation(self) -> Optional[str]:
        """Why peft 0.21 cannot run this variant here (lorafuse can; its tests say how), or None."""
        init = self.variant_kwargs()["init_lora_weights"]
        cpu = not torch.cuda.is_available()
        if init == "loftq" and cpu:
            return "peft's LoftQ init quantizes on CUDA only (lorafuse's runs on CPU: lora_core.init)"
        if self.quantization != "none" and isinstance(init, str) and init.startswith("pissa"):
            return "peft's PiSSA refuses quantized bases (lorafuse re-quantizes the residual, as peft's OLoRA does)"
        if self.quantization != "none" and init == "orthogonal":
            return "peft's orthogonal init casts A and B to the base weight's dtype, uint8 for bitsandbytes"
        if self.quantization == "int8" and self.use_dora and cpu:
            return ("peft's DoRA on an int8 base fails on CPU (dequantizing moves the weight and drops its SCB); "
                    "tests/lora_core/test_dora.py compares ours with peft on the dequantized weights")
        return None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def check_backend_available(backend: str) -> None:
    """Raise CompareError when `backend` cannot run on this machine (before any model is built)."""
    if backend != "triton":
        return
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise CompareError(f"backend 'triton' needs the triton package ({e}); use --backend torch") from None
    from kernels.triton import interpreting

    if not torch.cuda.is_available() and not interpreting():
        raise CompareError(
            "backend 'triton' needs a CUDA GPU, or Triton's interpreter on CPU (set TRITON_INTERPRET=1 "
            "before triton is imported; `python -m compare` does this itself); use --backend torch")


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
                                target_modules=spec.target_modules, **spec.variant_kwargs())


def peft_config(spec: ModelSpec):
    import peft

    return peft.LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                           target_modules=spec.target_modules, **spec.variant_kwargs())


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


def adapter_tensors(layer, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Every tensor of one adapter of a LoRA layer, ours or peft's, by peft's short name: lora_A
    [r, in], lora_B [out, r], and with the variants lora_B.bias [out] (lora_bias) and
    lora_magnitude_vector [out] (DoRA; ours on the adapter, peft's in its DoRA layer's .weight)."""
    A, B = lora_weights(layer, adapter)
    out = {"lora_A": A, "lora_B": B}
    if layer.lora_B[adapter].bias is not None:
        out["lora_B.bias"] = layer.lora_B[adapter].bias
    if hasattr(layer, "adapters"):
        magnitude = getattr(layer.adapters[adapter], "lora_magnitude_vector", None)
    else:
        dora = getattr(layer, "lora_magnitude_vector", {})
        magnitude = dora[adapter].weight if adapter in dora else None
    if magnitude is not None:
        out["lora_magnitude_vector"] = magnitude
    return out


@torch.no_grad()
def seed_lora_weights(keymap: dict, seed: int, adapter: str = "default") -> None:
    """Give every pair the same adapter tensors from a fixed seed; B is non-zero so the LoRA branch
    matters.

    A [r, in] ~ U(-1/sqrt(in), 1/sqrt(in)) (the scale of nn.Linear's default init);
    B [out, r] ~ N(0, 0.02^2): big enough that a wrong scaling shows, small enough to stay stable;
    lora_B.bias ~ N(0, 0.02^2); DoRA's magnitude: its init (||W|| per row, the same on both sides)
    times 1 + N(0, 0.05^2), so that the magnitude matters too.
    """
    g = torch.Generator().manual_seed(seed)
    for path, (mine, theirs) in keymap.items():
        tensors = adapter_tensors(mine, adapter)
        a, b = tensors["lora_A"], tensors["lora_B"]
        bound = 1.0 / a.shape[1] ** 0.5
        values = {"lora_A": (torch.rand(a.shape, generator=g, dtype=torch.float32) * 2 - 1) * bound,
                  "lora_B": torch.randn(b.shape, generator=g, dtype=torch.float32) * 0.02}
        if "lora_B.bias" in tensors:
            values["lora_B.bias"] = torch.randn(b.shape[0], generator=g) * 0.02
        if "lora_magnitude_vector" in tensors:
            values["lora_magnitude_vector"] = tensors["lora_magnitude_vector"].float() * (
                1 + 0.05 * torch.randn(b.shape[0], generator=g))
        copy_adapter(mine, theirs, values, adapter)


@torch.no_grad()
def copy_adapter(mine, theirs, values: dict[str, torch.Tensor], adapter: str = "default") -> None:
    """Write `values` ({peft short name: tensor}, see adapter_tensors) into one adapter of our layer
    and of peft's."""
    for layer in (mine, theirs):
        tensors = adapter_tensors(layer, adapter)
        if set(tensors) != set(values):
            raise CompareError(f"adapter tensors differ: {sorted(tensors)} vs {sorted(values)}")
        for name, src in values.items():
            dst = tensors[name]
            if dst.shape != src.shape:
                raise CompareError(f"{name} shape mismatch: {tuple(dst.shape)} vs {tuple(src.shape)}")
            dst.copy_(src.to(dst.dtype))


def lora_state(keymap: dict) -> dict:
    """{path: {name: tensor}} cloned from our layers: the adapter tensors to carry into a fresh pair."""
    return {p: {n: t.detach().float().clone() for n, t in adapter_tensors(m).items()} for p, (m, _) in keymap.items()}


def build_pair(spec: ModelSpec, lora_weights: Optional[dict] = None, keep_init: bool = False) -> Pair:
    """Load the base twice, wrap with ours and peft, and give both the same LoRA weights.

    lora_weights: {path: {name: tensor}} (`lora_state`) to copy in; None = seeded non-zero weights
    (`seed_lora_weights`). With a data-dependent init (PiSSA, OLoRA) both bases hold the residual
    their init wrote; the weights copied in then replace A and B on both sides alike. keep_init:
    copy nothing in (each side keeps what its own init drew from the seed).
    """
    import lora_core
    import peft
    from lora_core.config import DATA_INITS, init_kind

    base_ours, base_peft = load_base(spec), load_base(spec)
    try:
        torch.manual_seed(spec.seed)
        ours = lora_core.get_lora_model(base_ours, our_config(spec))
        ours.set_backend(spec.backend)
    except ValueError as e:  # lora_core's config/injection errors name the problem and the fix
        raise CompareError(f"lora_core refused this configuration: {e}") from None
    try:
        torch.manual_seed(spec.seed)
        theirs = peft.get_peft_model(base_peft, peft_config(spec))
    except ValueError as e:
        raise CompareError(f"peft refused this configuration: {e}") from None
    if spec.use_dora and spec.quantization in ("nf4", "fp4") and not torch.cuda.is_available():
        # bitsandbytes' eval-mode CPU path repacks 4-bit weights in place, and peft's DoRA then
        # dequantizes that storage as the standard layout: a wrong W (logits 37 % off on the tiny
        # default). Switched off on peft's side so the rows compare DoRA, not that bug.
        for m in theirs.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    if spec.quantization == "int8" and init_kind(spec.variant_kwargs()["init_lora_weights"]) in DATA_INITS:
        # peft's OLoRA dequantizes the int8 base, which caches the old SCB in the layer's state, then
        # installs a re-quantized weight: until a forward refreshes that state, a merge or a second
        # init would read the new codes with the old scales. One forward on peft's side refreshes it.
        with torch.no_grad():
            theirs(input_ids=torch.ones(1, 2, dtype=torch.long, device=next(theirs.parameters()).device))
    keymap = make_keymap(ours, theirs)
    if lora_weights is not None:
        for p, (m, t) in keymap.items():
            copy_adapter(m, t, lora_weights[p])
    elif not keep_init:
        seed_lora_weights(keymap, spec.seed)
    return Pair(ours, theirs, keymap)


def lora_params(model) -> list[torch.nn.Parameter]:
    """The trainable parameters (the adapter tensors here), in a fixed order, for an optimizer."""
    return [p for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]) if p.requires_grad]
