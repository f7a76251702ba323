"""Bottleneck adapters in the format of astraios' peft fork (peft 0.6.0.dev0, `peft_type: "BOTTLENECK"`).

    adapter(h) = adapter_up(act(adapter_down(dropout(h))))       computed in fp32, cast back
    parallel:        y = base(x) + adapter(x) * scaling           (down [b, in], up [out, b])
    serial, input:   y = base(x + adapter(x) * scaling)           "mh_adapter"     (down [b, in], up [in, b])
    serial, output:  y = base(x) + adapter(base(x)) * scaling     "output_adapter" (down [b, out], up [out, b])

(cast back = to the dtype of the tensor the adapter's output is added to, before scaling, as the
fork does.) A parallel adapter is a LoRA whose down-projection output goes through an activation.
Which serial form a target gets depends on the architecture and the target's last name component
(the fork's TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING, below); `use_parallel_adapter` makes every
target parallel. `scaling` is a float, or "learned": then a parameter `adapter_scaling` [1] (ones).

File keys (the fork saves its state-dict keys as they are, no adapter name):
`base_model.model.<path>.adapter_down.weight` [b, in], `.adapter_up.weight` [out, b] and, for
learned scaling, `.adapter_scaling`. The json holds the fork's fields only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from ..config import _as_set
from . import MethodConfig

PARALLEL, INPUT, OUTPUT = "parallel_adapter", "mh_adapter", "output_adapter"  # the fork's names

# The fork's peft/src/peft/utils/other.py (facts): serial placement per architecture and target name,
# and its default target lists.
ADAPTER_TYPE = {
    "bloom": {"dense_h_to_4h": INPUT, "dense_4h_to_h": OUTPUT},
    "gptj": {"fc_in": INPUT, "fc_out": OUTPUT},
    "gpt_bigcode": {"c_fc": INPUT, "c_proj": OUTPUT},
    "gpt_neo": {"c_fc": INPUT, "c_proj": OUTPUT},
    "llama": {"gate_proj": INPUT, "up_proj": INPUT, "down_proj": OUTPUT},
    "opt": {"fc1": INPUT, "fc2": OUTPUT},
    "chatglm": {"dense_h_to_4h": INPUT, "dense_4h_to_h": OUTPUT},
}
DEFAULT_TARGETS = {
    "bottleneck": {"bloom": ["dense_h_to_4h", "dense_4h_to_h"], "gptj": ["fc_in", "fc_out"],
                   "gpt_neo": ["c_fc", "c_proj"], "llama": ["gate_proj", "up_proj", "down_proj"],
                   "opt": ["fc1", "fc2"], "chatglm": ["dense_h_to_4h", "dense_4h_to_h"],
                   "gpt_bigcode": ["c_fc", "mlp.c_proj"]},
    "adapterp": {"bloom": ["dense_4h_to_h"], "gptj": ["fc_out"], "gpt_neo": ["c_proj"], "llama": ["down_proj"],
                 "opt": ["fc2"], "chatglm": ["dense_4h_to_h"], "gpt_bigcode": ["mlp.c_proj"]},
    "parallel": {"bloom": ["query_key_value"], "gptj": ["q_proj", "v_proj", "k_proj"],
                 "gpt_neo": ["q_proj", "v_proj", "k_proj"], "llama": ["q_proj", "v_proj", "k_proj"],
                 "opt": ["q_proj", "v_proj", "k_proj"], "chatglm": ["query_key_value"],
                 "gpt_bigcode": ["c_attn"]},
}


@dataclass
class BottleneckConfig(MethodConfig):
    """The fork's BottleneckConfig, field for field.

    bottleneck_size: the adapter's inner width; non_linearity: an `ACT2FN` name ("tanh", "relu",
    "gelu", ...); adapter_dropout: dropout on the adapter input; target_modules: suffixes or a regex
    (None: the fork's per-architecture default for the chosen form); use_parallel_adapter: parallel
    form on every target; use_adapterp: with serial adapters, the AdapterP default targets (output
    side only); scaling: float or "learned"; bias: "none" (the fork's "all" / "adapter_only" are
    not implemented here); init_weights: "bert" (both N(0, 0.02)) or "mam_adapter" (down
    kaiming-uniform, up zeros: the model starts as the base).
    """

    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    peft_type: str = "BOTTLENECK"
    task_type: Optional[str] = None
    inference_mode: bool = False
    bottleneck_size: int = 256
    non_linearity: str = "tanh"
    adapter_dropout: float = 0.0
    target_modules: Optional[Union[list[str], set[str], str]] = None
    use_parallel_adapter: bool = False
    use_adapterp: bool = False
    scaling: Union[float, str] = 1.0
    bias: str = "none"
    init_weights: str = "bert"
    modules_to_save: Optional[list[str]] = None

    IGNORED_KEYS = ("auto_mapping", "peft_version")
    exclude_modules = None
    model_type = None  # set by prepare_for (the serial placement depends on the architecture)

    def __post_init__(self):
        self.target_modules = _as_set(self.target_modules)
        self.validate()

    def validate(self) -> None:
        from transformers.activations import ACT2FN
        if self.peft_type != "BOTTLENECK":
            raise ValueError(f"peft_type={self.peft_type!r}: BottleneckConfig is peft_type 'BOTTLENECK'")
        self._check_common()
        b = self.bottleneck_size
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise ValueError(f"bottleneck_size={b!r}: must be a positive integer")
        if self.non_linearity not in ACT2FN:
            raise ValueError(f"non_linearity={self.non_linearity!r}: not an ACT2FN name. Fix: use one of "
                             f"{sorted(ACT2FN)[:12]}...")
        if not isinstance(self.adapter_dropout, (int, float)) or not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"adapter_dropout={self.adapter_dropout!r}: must be in [0, 1)")
        s = self.scaling
        if not (s == "learned" or (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s))):
            raise ValueError(f"scaling={s!r}: a finite number or 'learned'")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r}: only bias='none' is implemented for bottleneck adapters. "
                             f"Fix: bias='none', or use the astraios fork of peft for this adapter.")
        if self.init_weights not in ("bert", "mam_adapter"):
            raise ValueError(f"init_weights={self.init_weights!r}: use 'bert' or 'mam_adapter'")

    def default_targets(self, model_type) -> list[str]:
        form = "parallel" if self.use_parallel_adapter else "adapterp" if self.use_adapterp else "bottleneck"
        table = DEFAULT_TARGETS[form]
        if model_type not in table:
            raise ValueError(f"target_modules=None but the astraios fork has no default {form} targets for "
                             f"model_type={model_type!r}. Fix: pass target_modules. Known: {sorted(table)}")
        return list(table[model_type])

    def prepare_for(self, model: nn.Module) -> None:
        self.model_type = getattr(getattr(model, "config", None), "model_type", None)

    def placement(self, path: str) -> str:
        """PARALLEL, INPUT or OUTPUT for the target at `path` (the fork's rule)."""
        if self.use_parallel_adapter:
            return PARALLEL
        model_type = self.model_type
        name = path.rsplit(".", 1)[-1]
        kind = ADAPTER_TYPE.get(model_type, {}).get(name)
        if kind is None:
            raise ValueError(f"target {path!r}: the astraios fork places serial adapters only on "
                             f"{ADAPTER_TYPE.get(model_type, {}) or 'no module'} for model_type={model_type!r}. "
                             f"Fix: use_parallel_adapter=True, or target those modules.")
        return kind


class BottleneckAdapter(nn.Module):
    """One bottleneck adapter of a layer: adapter_down [b, d_in], adapter_up [d_out, b], the
    activation `act_fn`, `adapter_dropout`, and `scaling` (float) or `adapter_scaling` [1]."""

    method = "bottleneck"

    def __init__(self, in_features: int, out_features: int, placement: str = PARALLEL, bottleneck_size: int = 256,
                 non_linearity: str = "tanh", adapter_dropout: float = 0.0, scaling: Union[float, str] = 1.0,
                 init_weights: str = "bert", dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None):
        super().__init__()
        from transformers.activations import ACT2FN
        self.placement = placement
        # the adapter's own in/out width: the layer input (parallel, input side) or output (output side)
        d_in = out_features if placement == OUTPUT else in_features
        d_out = in_features if placement == INPUT else out_features
        self.non_linearity = non_linearity
        self.act_fn = ACT2FN[non_linearity]
        self.adapter_dropout = nn.Dropout(adapter_dropout) if adapter_dropout > 0 else nn.Identity()
        self.adapter_down = nn.Linear(d_in, bottleneck_size, bias=False, device=device, dtype=dtype)  # [b, d_in]
        self.adapter_up = nn.Linear(bottleneck_size, d_out, bias=False, device=device, dtype=dtype)   # [d_out, b]
        if scaling == "learned":
            self.adapter_scaling = nn.Parameter(torch.ones(1, device=device, dtype=dtype))
        else:
            self.scaling = float(scaling)
        with torch.no_grad():
            if init_weights == "bert":
                nn.init.normal_(self.adapter_down.weight, mean=0.0, std=0.02)
                nn.init.normal_(self.adapter_up.weight, mean=0.0, std=0.02)
            else:  # "mam_adapter"
                nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
                nn.init.zeros_(self.adapter_up.weight)

    @property
    def kernel_reason(self) -> str:
        if self.placement == PARALLEL:
            return "a parallel adapter needs an activation on u = adapter_down(x) [M, b]; the fused kernels have none yet"
        return "a serial bottleneck adapter transforms the layer's input or output, which the fused kernels do not"

    @classmethod
    def from_config(cls, config: BottleneckConfig, path: str, in_features: int, out_features: int,
                    dtype: torch.dtype, device) -> "BottleneckAdapter":
        return cls(in_features, out_features, placement=config.placement(path),
                   bottleneck_size=config.bottleneck_size, non_linearity=config.non_linearity,
                   adapter_dropout=config.adapter_dropout, scaling=config.scaling,
                   init_weights=config.init_weights, dtype=dtype, device=device)

    def fused_args(self):
        return None

    def _scale(self):
        return self.adapter_scaling if hasattr(self, "adapter_scaling") else self.scaling

    def _branch(self, h: torch.Tensor) -> torch.Tensor:
        """adapter(h) * scaling, h [..., d_in] -> [..., d_out]: in the adapter dtype, cast to h's dtype
        before scaling (the fork's order)."""
        w = self.adapter_down.weight
        out = self.adapter_up(self.act_fn(self.adapter_down(self.adapter_dropout(h.to(w.dtype)))))
        return out.to(h.dtype) * self._scale()

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._branch(x) if self.placement == INPUT else x

    def forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self.placement == PARALLEL:
            w = self.adapter_down.weight
            out = self.adapter_up(self.act_fn(self.adapter_down(self.adapter_dropout(x.to(w.dtype)))))
            return result + out.to(result.dtype) * self._scale()
        if self.placement == OUTPUT:
            return result + self._branch(result)
        return result

    @property
    def merge_refusal(self) -> str:
        return (f"a bottleneck adapter ({self.non_linearity} between adapter_down and adapter_up) is not "
                f"linear, so it has no weight delta to merge. Fix: keep it unmerged (save_pretrained writes "
                f"it in the astraios format)")
