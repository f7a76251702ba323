"""LoraConfig: peft's LoRA settings, field for field, so adapter_config.json needs no translation.

`to_dict()` writes exactly the keys peft 0.21 writes (including the fields of peft features we do
not implement, at their default values) and nothing of our own: older peft versions reject unknown
keys. `from_dict()` reads a json written by any peft version; a peft feature we do not implement
that is switched on (e.g. `use_dora: true`) is refused with a clear error instead of being ignored.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# Default target_modules per `config.model_type` when target_modules is None. These are facts read
# from peft 0.21's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (tests check ours equals it).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
}

# Fields peft 0.21 writes for LoRA features we do not implement, with their default values. We
# write them unchanged so the json matches peft's; reading a non-default value is an error.
UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "megatron_config": None,
    "trainable_token_indices": None,
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "layer_replication": None,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}


# init_lora_weights values besides True / False (peft's strings; "pissa_niter_<N>" is the fast-SVD PiSSA).
# "gaussian" and "olora" are matched case-insensitively, as peft does.
INIT_STRINGS = ("gaussian", "pissa", "pissa_niter_<N>", "olora", "orthogonal", "loftq")
# inits that read the base weight and rewrite it as peft does (residual W - scaling * B @ A, or LoftQ's Q)
DATA_INITS = ("pissa", "olora", "loftq")


@dataclass
class LoftQConfig:
    """peft's LoftQConfig: loftq_bits (4 = nf4, 8 = int8) and loftq_iter (alternating iterations >= 1)."""

    loftq_bits: int = 4
    loftq_iter: int = 1


def init_kind(init) -> Optional[str]:
    """The init family of an init_lora_weights value: "default" (True), "none" (False), "gaussian",
    "orthogonal", "pissa" (also "pissa_niter_<N>"), "olora", "loftq"; None when it is not one."""
    if init is True:
        return "default"
    if init is False:
        return "none"
    if not isinstance(init, str):
        return None
    if init.lower() in ("gaussian", "olora"):
        return init.lower()
    if init in ("orthogonal", "loftq", "pissa") or pissa_niter(init) is not None:
        return "pissa" if init.startswith("pissa") else init
    return None


def pissa_niter(init) -> Optional[int]:
    """N of "pissa_niter_<N>" (power iterations of torch.svd_lowrank), else None."""
    if isinstance(init, str) and init.startswith("pissa_niter_") and init[len("pissa_niter_"):].isdigit():
        return int(init[len("pissa_niter_"):])
    return None


def default_target_modules(model_type: Optional[str]) -> list[str]:
    """peft's default target_modules for a transformers `model_type`; ValueError if it has none."""
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"target_modules=None but there is no default target list for model_type={model_type!r}. "
            f"Fix: pass target_modules explicitly (a list of module-name suffixes such as ['q_proj', "
            f"'v_proj'], a regex string, or 'all-linear'). Known model types: "
            f"{sorted(DEFAULT_TARGET_MODULES)}")
    return list(DEFAULT_TARGET_MODULES[model_type])


def _as_set(value):
    """peft stores list-valued target/exclude modules as sets; strings (regex) stay strings."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return set(value)
    return value


@dataclass
class LoraConfig:
    """LoRA settings with peft's names and defaults.

    r: rank; lora_alpha: scaling numerator (scaling = lora_alpha / r, or / sqrt(r) with use_rslora);
    lora_dropout: dropout on the LoRA branch's input, in [0, 1); target_modules: list of module-name
    suffixes, a regex (full match against the module path), "all-linear" (every linear layer but the
    output head) or None (peft's per-architecture default); exclude_modules: same forms, wins over
    target_modules; bias: "none" | "all" | "lora_only" (which base biases train); fan_in_fan_out:
    True when the base stores W as [in, out] (set automatically for GPT-2's Conv1D);
    modules_to_save: names (suffixes) of extra modules trained in full and saved with the adapter;
    init_lora_weights: True (A kaiming-uniform, B zeros), "gaussian" (A ~ N(0, 1/r), B zeros),
    False (both random, for tests), "orthogonal" (A, B from one random orthogonal [r, r]; r even),
    or a data-dependent init that rewrites the base weight (lora_core.init): "pissa" /
    "pissa_niter_<N>" (A, B from the top-r singular triplets of W), "olora" (from W's QR), "loftq"
    (needs loftq_config; a dense base becomes its nf4/int8 quantization Q, A and B fit W - Q);
    loftq_config: {"loftq_bits": 4 | 8, "loftq_iter": >= 1} (or a LoftQConfig);
    use_dora: DoRA (a trainable magnitude per output row, lora_core.dora); lora_bias: a trainable
    bias on lora_B (init True / False only, not with DoRA); layers_to_transform / layers_pattern: restrict to some layer
    indices; rank_pattern / alpha_pattern: per-module r / alpha overrides keyed by a name regex.
    """

    task_type: Optional[str] = None
    peft_type: str = "LORA"
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None  # kept when read from a peft json; we never invent one
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    r: int = 8
    target_modules: Optional[Union[list[str], set[str], str]] = None
    exclude_modules: Optional[Union[list[str], set[str], str]] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    loftq_config: Union[dict, LoftQConfig] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    # peft fields that only matter with a feature we lack (kept so the json round-trips).
    megatron_core: Optional[str] = "megatron.core"
    qalora_group_size: int = 16

    def __post_init__(self):
        self.target_modules = _as_set(self.target_modules)
        self.exclude_modules = _as_set(self.exclude_modules)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        if isinstance(self.loftq_config, LoftQConfig):
            self.loftq_config = dataclasses.asdict(self.loftq_config)  # peft stores it as a dict too
        if self.loftq_config and self.init_lora_weights != "loftq":
            warnings.warn("loftq_config is set but init_lora_weights is not 'loftq': it is ignored "
                          "(and dropped, as peft does).")
            self.loftq_config = {}
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and the fix if any setting is invalid."""
        if self.peft_type != "LORA":
            raise ValueError(f"peft_type={self.peft_type!r}: only LoRA adapters are supported "
                             f"(peft_type 'LORA').")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r}: the LoRA rank must be a positive integer. Fix: pass e.g. r=8.")
        for key, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"rank_pattern[{key!r}]={rank!r}: every rank must be a positive integer.")
        if (isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float))
                or not math.isfinite(self.lora_alpha)):
            raise ValueError(f"lora_alpha={self.lora_alpha!r}: must be a finite number. Fix: pass e.g. "
                             f"lora_alpha=16.")
        for key, alpha in self.alpha_pattern.items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                raise ValueError(f"alpha_pattern[{key!r}]={alpha!r}: every alpha must be a finite number.")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r}: must be in [0, 1). "
                             f"Fix: pass e.g. lora_dropout=0.05, or 0.0 for none.")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias={self.bias!r}: unknown bias mode. Fix: use one of {list(BIAS_MODES)}.")
        self._validate_variants()
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type={self.task_type!r}: unknown. Fix: use None or one of {list(TASK_TYPES)}.")
        tm = self.target_modules
        if not (tm is None or isinstance(tm, (str, set))):
            raise ValueError(f"target_modules={tm!r}: must be None, a list of names, a regex string or "
                             f"'all-linear'.")
        if isinstance(tm, str) and (self.layers_to_transform is not None or self.layers_pattern is not None):
            raise ValueError("layers_to_transform / layers_pattern cannot be used when target_modules is a "
                             "regex string. Fix: encode the layer indices in the regex, or pass a list.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern is set but layers_to_transform is None. Fix: also pass "
                             "layers_to_transform (the layer indices to adapt).")
        if self.modules_to_save is not None and (isinstance(self.modules_to_save, str)
                                                 or not all(isinstance(m, str) for m in self.modules_to_save)):
            raise ValueError(f"modules_to_save={self.modules_to_save!r}: must be a list of module names.")

    def _validate_variants(self) -> None:
        """init_lora_weights, loftq_config, use_dora and lora_bias, with peft's rules (peft raises
        some of these only when the layers are built; here they fail before the model changes)."""
        init = self.init_lora_weights
        kind = init_kind(init)
        if kind is None:
            raise ValueError(f"init_lora_weights={init!r}: not supported. Fix: use True (peft's default: "
                             f"A kaiming-uniform, B zeros), False, or one of {list(INIT_STRINGS)} "
                             f"(<N>: SVD power iterations, e.g. 'pissa_niter_4').")
        if kind == "orthogonal":
            odd = {k: v for k, v in {"r": self.r, **self.rank_pattern}.items() if v % 2}
            if odd:
                raise ValueError(f"init_lora_weights='orthogonal' needs an even rank (it pairs the rows of "
                                 f"an r x r orthogonal matrix); odd: {odd}. Fix: use even ranks.")
        if kind == "loftq":
            lq = self.loftq_config
            if not isinstance(lq, dict) or not lq:
                raise ValueError("init_lora_weights='loftq' needs loftq_config, e.g. "
                                 "{'loftq_bits': 4, 'loftq_iter': 1} (peft's LoftQConfig).")
            unknown = sorted(set(lq) - {"loftq_bits", "loftq_iter"})
            bits, iters = lq.get("loftq_bits", 4), lq.get("loftq_iter", 1)
            if unknown or bits not in (4, 8) or isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
                raise ValueError(f"loftq_config={lq!r}: loftq_bits must be 4 (nf4) or 8 (int8) and loftq_iter "
                                 f"an integer >= 1{f'; unknown keys {unknown}' if unknown else ''}.")
        if not isinstance(self.use_dora, bool) or not isinstance(self.lora_bias, bool):
            raise ValueError(f"use_dora={self.use_dora!r}, lora_bias={self.lora_bias!r}: both must be True or False.")
        if self.lora_bias and kind not in ("default", "none"):
            raise ValueError(f"lora_bias=True works with init_lora_weights True or False only (as in peft), "
                             f"got {init!r}.")
        if self.lora_bias and self.use_dora:
            raise ValueError("lora_bias=True is not supported with use_dora=True (as in peft). Fix: drop one.")

    # ---- adapter_config.json -------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The dict peft's `save_pretrained` writes to adapter_config.json (sets as sorted lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = copy.deepcopy(getattr(self, f.name))
            if isinstance(value, set):
                value = sorted(value)
            out[f.name] = value
        for name, default in UNSUPPORTED_DEFAULTS.items():
            out[name] = copy.deepcopy(default)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        """Read an adapter_config.json dict written by peft (any version) or by us.

        peft-only fields at their default value are ignored; a peft feature we do not implement that
        is switched on raises ValueError; keys no peft version we know writes are ignored with a
        warning (newer peft versions add fields).
        """
        d = dict(d)
        if d.get("peft_type", "LORA") not in ("LORA", None):
            raise ValueError(f"peft_type={d.get('peft_type')!r}: this adapter is not LoRA; only LoRA "
                             f"adapters are supported.")
        ours = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in ours:
                kwargs[key] = value
            elif key in UNSUPPORTED_DEFAULTS:
                default = UNSUPPORTED_DEFAULTS[key]
                if not (value == default or (value in (None, {}, [], False) and default in (None, {}, False))):
                    raise ValueError(
                        f"adapter config sets {key}={value!r}, a peft LoRA feature lorafuse does not "
                        f"implement. Fix: use peft for this adapter, or train one without {key}.")
            else:
                if value not in (None, False, {}, []):
                    warnings.warn(f"adapter config key {key!r}={value!r} is unknown to lorafuse; ignored.")
        kwargs["peft_type"] = "LORA"
        return cls(**kwargs)

    def copy(self) -> "LoraConfig":
        return copy.deepcopy(self)
