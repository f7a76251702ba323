"""(IA)^3 (Liu et al. 2022): a learned per-feature scale on a linear layer, peft's IA3 method.

    feed-forward module:  y = base(x * l)     l = ia3_l [1, in]   (scales the columns of W)
    any other module:     y = base(x) * l     l = ia3_l [out, 1]  (scales the rows of W and the bias)

l starts at ones (init_ia3_weights=True), so the model starts as the base. File key per layer:
`base_model.model.<path>.ia3_l` (peft's). Merging multiplies W (and, for output scaling, the bias)
by l; unmerging divides by l + 1e-8, as peft does (so it is exact only up to rounding).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from ..config import _as_set
from . import MethodConfig

# peft 0.21's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING
# (facts; tests check ours equal peft's for every model type listed here).
DEFAULT_TARGET_MODULES = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"], "bert": ["key", "value", "output.dense"],
    "falcon": ["query_key_value", "dense_4h_to_h"], "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"], "gemma2": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
}
DEFAULT_FEEDFORWARD_MODULES = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"], "opt": ["fc2"], "gptj": ["fc_out"], "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"], "bart": ["fc2"], "gpt_bigcode": ["mlp.c_proj"], "llama": ["down_proj"],
    "mistral": ["down_proj"], "mixtral": ["w2"], "bert": ["output.dense"], "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"], "gemma": ["down_proj"], "gemma2": ["down_proj"], "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


def _defaults(table: dict, model_type, what: str) -> list[str]:
    if model_type not in table:
        raise ValueError(f"{what}=None but IA3 has no default for model_type={model_type!r}. Fix: pass "
                         f"{what} explicitly. Known model types: {sorted(table)}")
    return list(table[model_type])


@dataclass
class IA3Config(MethodConfig):
    """peft's IA3Config, field for field.

    target_modules: module-name suffixes, a full-match regex, "all-linear" or None (peft's
    per-architecture default); feedforward_modules: the targets whose INPUT is scaled (a subset of
    target_modules; None: peft's default for the architecture); exclude_modules, modules_to_save
    as in LoraConfig; init_ia3_weights: True starts every scale at 1 (False keeps random draws).
    """

    task_type: Optional[str] = None
    peft_type: str = "IA3"
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    target_modules: Optional[Union[list[str], set[str], str]] = None
    exclude_modules: Optional[Union[list[str], set[str], str]] = None
    feedforward_modules: Optional[Union[list[str], set[str], str]] = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None
    init_ia3_weights: bool = True

    def __post_init__(self):
        self.target_modules = _as_set(self.target_modules)
        self.exclude_modules = _as_set(self.exclude_modules)
        self.feedforward_modules = _as_set(self.feedforward_modules)
        self.validate()

    def validate(self) -> None:
        if self.peft_type != "IA3":
            raise ValueError(f"peft_type={self.peft_type!r}: IA3Config is peft_type 'IA3'")
        self._check_common()
        ff, tm = self.feedforward_modules, self.target_modules
        # peft compares the two sets literally, so it refuses its own file for target_modules="all-linear"
        # (saved as full paths, feedforward_modules as names); here a name counts when it names a target
        if isinstance(ff, set) and isinstance(tm, set) and not all(
                any(t == f or t.endswith("." + f) for t in tm) for f in ff):
            raise ValueError(f"feedforward_modules={sorted(ff)} must be a subset of target_modules={sorted(tm)} "
                             f"(as in peft).")
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights={self.init_ia3_weights!r}: must be True or False")

    def default_targets(self, model_type) -> list[str]:
        return _defaults(DEFAULT_TARGET_MODULES, model_type, "target_modules")

    def prepare_for(self, model: nn.Module) -> None:
        """Fill feedforward_modules with peft's default for the architecture when it is None."""
        if self.feedforward_modules is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            self.feedforward_modules = set(_defaults(DEFAULT_FEEDFORWARD_MODULES, model_type,
                                                     "feedforward_modules"))

    def targets_resolved(self, paths: list[str]) -> None:
        """After target_modules became the adapted paths ("all-linear"): feedforward_modules as the
        feed-forward ones among them, so that peft's literal subset check accepts the saved file."""
        ff, tm = self.feedforward_modules, self.target_modules
        if isinstance(ff, set) and isinstance(tm, set) and not ff <= tm:
            self.feedforward_modules = {p for p in paths if self.is_feedforward(p)}

    def is_feedforward(self, path: str) -> bool:
        """peft's rule: a regex must match the whole path; a name list matches by suffix."""
        ff = self.feedforward_modules or set()
        if isinstance(ff, str):
            return re.fullmatch(ff, path) is not None
        return any(path.endswith(name) for name in ff)


class IA3Adapter(nn.Module):
    """One IA3 scale of a layer. ia3_l: [1, in] (feed-forward: scales the input) or [out, 1]."""

    method = "ia3"
    kernel_reason = ("the fused kernels have no row/column scale of W yet (an epilogue / prologue "
                     "scale: the kernels issue)")

    def __init__(self, in_features: int, out_features: int, is_feedforward: bool = False,
                 init_ia3_weights: bool = True, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.is_feedforward = is_feedforward
        shape = (1, in_features) if is_feedforward else (out_features, 1)
        # peft draws randn (on the CPU generator) whatever the init, so the same seed gives the same
        # later draws; nothing is drawn for a shape-only (meta) adapter
        meta = device is not None and torch.device(device).type == "meta"
        weight = torch.empty(shape, device="meta") if meta else torch.randn(shape)
        self.ia3_l = nn.Parameter(weight.to(device=device, dtype=dtype))
        if init_ia3_weights:
            with torch.no_grad():
                self.ia3_l.fill_(1.0)

    @classmethod
    def from_config(cls, config: IA3Config, path: str, in_features: int, out_features: int,
                    dtype: torch.dtype, device) -> "IA3Adapter":
        return cls(in_features, out_features, is_feedforward=config.is_feedforward(path),
                   init_ia3_weights=config.init_ia3_weights, dtype=dtype, device=device)

    def fused_args(self):
        return None

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> x * l in l's dtype, rounded back to x's dtype (peft's order)."""
        if not self.is_feedforward:
            return x
        return (x.to(self.ia3_l.dtype) * self.ia3_l.flatten()).to(x.dtype)

    def forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # result [..., N]: the base output (of the scaled input, for a feed-forward module)
        if self.is_feedforward:
            return result
        return (result * self.ia3_l.flatten()).to(result.dtype)

    def merge_into(self, w: torch.Tensor, sign: int) -> torch.Tensor:
        """W [N, K] fp32 -> W * l (sign +1) or W / (l + 1e-8) (sign -1); l broadcasts as a row or
        column scale by its shape."""
        l = self.ia3_l.float()
        return w * l if sign > 0 else w / (l + 1e-8)

    def merge_bias(self, b: torch.Tensor, sign: int) -> torch.Tensor:
        """Output scaling scales the bias too; feed-forward (input) scaling leaves it."""
        if self.is_feedforward:
            return b
        l = self.ia3_l.float().reshape(b.shape)
        return b.float() * l if sign > 0 else b.float() / (l + 1e-8)
