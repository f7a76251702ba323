"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose ranks are pruned during training, peft's ADALORA.

    y = base(x) + (dropout(x) @ (A * E)^T @ B^T) * scaling / (ranknum + 1e-5)

A = lora_A [r, in] (right singular vectors), E = lora_E [r, 1] (singular values, zeros at init),
B = lora_B [out, r] (left singular vectors); scaling = lora_alpha (or r when lora_alpha <= 0);
ranknum = the initial rank init_r, kept when the layer is pruned. Training adds peft's orthogonality
regulariser to the loss (`orth_regulariser`) and calls `update_and_allocate(step)` after each
optimizer step: an importance score per singular triplet (|p * grad| smoothed by EMAs beta1/beta2,
times its uncertainty) decides which triplets' E is zeroed to meet a budget that falls from the sum
of init_r to target_r per layer on a cubic schedule between tinit and total_step - tfinal.

File: `<path>.lora_A`, `.lora_B`, `.lora_E` (no `.weight`, peft's keys), only the kept triplets once
`rank_pattern` (in the config: `{"<path>.lora_E": [kept?] * init_r}`) is set; loading such a file
builds each layer at its kept rank with ranknum = init_r, as peft does.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import LoraConfig

# peft 0.21's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING (facts).
DEFAULT_TARGET_MODULES = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"], "gpt_bigcode": ["c_attn"],
}
EPS = 1e-5  # peft's guard in scaling / (ranknum + EPS)


@dataclass
class AdaLoraConfig(LoraConfig):
    """peft's AdaLoraConfig: every LoraConfig field plus the rank-allocation schedule.

    init_r: starting rank of every layer; target_r: the average rank at the end; tinit / tfinal:
    steps without pruning at the start / end; deltaT: steps between two allocations; beta1 / beta2:
    EMA factors of the importance and its uncertainty; orth_reg_weight: weight of the
    orthogonality regulariser; total_step: the planned number of steps (required);
    rank_pattern: what allocation kept, {"<module path>.lora_E": [bool] * init_r} (None before).
    `r` is not used (peft warns when it is set).
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict] = None

    def __post_init__(self):
        self.peft_type = "ADALORA"
        # LoraConfig's set handling, without its rank_pattern rewrite (here None means "not allocated yet")
        from ..config import _as_set
        self.target_modules = _as_set(self.target_modules)
        self.exclude_modules = _as_set(self.exclude_modules)
        self.alpha_pattern = dict(self.alpha_pattern or {})
        if self.r != 8:
            warnings.warn("AdaLoraConfig: `r` is not used by AdaLoRA (as in peft); set init_r for the starting rank.")
        self.validate()

    def validate(self) -> None:
        # LoraConfig's checks of the shared fields, on a view that is plain LoRA (its rank_pattern
        # means per-module ranks, ours the allocation masks)
        plain = object.__new__(LoraConfig)
        plain.__dict__.update(self.__dict__, peft_type="LORA", rank_pattern={})
        LoraConfig.validate(plain)
        for name in ("init_r", "target_r", "tinit", "tfinal", "deltaT"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "deltaT" else 0):
                raise ValueError(f"{name}={v!r}: must be an integer >= {1 if name == 'deltaT' else 0}")
        if self.total_step is None or isinstance(self.total_step, bool) or not isinstance(self.total_step, int) \
                or self.total_step <= 0:
            raise ValueError(f"total_step={self.total_step!r}: AdaLoRA needs the planned number of training "
                             f"steps (> 0), as in peft. Fix: pass total_step=max_steps.")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leave no "
                             f"budgeting phase (tinit must be < total_step - tfinal), as in peft.")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ValueError(f"{name}={v!r}: must be in (0, 1)")
        if not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight={self.orth_reg_weight!r}: must be >= 0")
        if self.rank_pattern is not None and not (isinstance(self.rank_pattern, dict) and all(
                isinstance(v, list) and all(isinstance(b, bool) for b in v) for v in self.rank_pattern.values())):
            raise ValueError("rank_pattern: AdaLoRA's rank_pattern maps '<path>.lora_E' to a list of booleans "
                             "(which singular triplets were kept)")

    @classmethod
    def from_dict(cls, d: dict) -> "AdaLoraConfig":
        d = dict(d)
        d.pop("peft_type", None)
        return super().from_dict(d)  # LoraConfig's reading rules, into this class

    def default_targets(self, model_type) -> list[str]:
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(f"target_modules=None but AdaLoRA has no default for model_type={model_type!r}. "
                             f"Fix: pass target_modules. Known: {sorted(DEFAULT_TARGET_MODULES)}")
        return list(DEFAULT_TARGET_MODULES[model_type])

    def kept(self, path: str) -> Optional[list[bool]]:
        """The allocation mask of the layer at `path` (None: not pruned)."""
        return (self.rank_pattern or {}).get(f"{path}.lora_E")


class AdaLoraAdapter(nn.Module):
    """One AdaLoRA adapter of a layer (see the module docstring for the formula)."""

    method = "adalora"
    kernel_reason = None  # additive: the base runs on any backend, this term in PyTorch
    fixed_parameters = ("ranknum",)  # a Parameter as in peft (counted in "all params"), never trained or saved

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, init_lora_weights=True, ranknum: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
        super().__init__()
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha if lora_alpha > 0 else float(r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        meta = device is not None and torch.device(device).type == "meta"
        draw = (lambda *s: torch.empty(*s, device="meta")) if meta else torch.randn
        # peft's draws, in its order: A, E, B, then one for ranknum (filled with r right after)
        a, e, b, _ = draw(r, in_features), draw(r, 1), draw(out_features, r), draw(1)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))   # [r, K]
        self.lora_B = nn.Parameter(b.to(device=device, dtype=dtype))   # [N, r]
        self.lora_E = nn.Parameter(e.to(device=device, dtype=dtype))   # [r, 1]
        self.ranknum = nn.Parameter(torch.full((1,), float(r if ranknum is None else ranknum),
                                               device=device, dtype=dtype), requires_grad=False)
        if init_lora_weights:
            with torch.no_grad():
                nn.init.zeros_(self.lora_E)
                nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    @classmethod
    def from_config(cls, config: AdaLoraConfig, path: str, in_features: int, out_features: int,
                    dtype: torch.dtype, device) -> "AdaLoraAdapter":
        kept = config.kept(path)
        # a file written after allocation holds only the kept triplets; ranknum stays init_r (peft)
        r = sum(kept) if kept is not None else config.init_r
        return cls(in_features, out_features, r=r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                   init_lora_weights=config.init_lora_weights, ranknum=config.init_r, dtype=dtype, device=device)

    @property
    def dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def fused_args(self):
        # The fused kernel takes one scale; peft multiplies by scaling, then divides by ranknum, and
        # one combined scale rounds differently. Exact first: the term runs in PyTorch.
        return None

    def term(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in the adapter dtype, in peft's order of operations."""
        x = x.to(self.lora_A.dtype)
        return (self.lora_dropout(x) @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling \
            / (self.ranknum + EPS)

    def forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return result + self.term(x)

    def delta_weight(self) -> torch.Tensor:
        """[N, K] fp32: B @ (A * E) * scaling / (ranknum + 1e-5)."""
        return (self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float())) * self.scaling \
            / (self.ranknum.float() + EPS)

    def tensors_to_save(self, config: AdaLoraConfig, path: str) -> dict[str, torch.Tensor]:
        """peft's saved tensors: lora_A, lora_B, lora_E, only the kept triplets once allocated."""
        A, B, E = self.lora_A, self.lora_B, self.lora_E
        kept = config.kept(path)
        if kept is not None and len(kept) == A.shape[0] and sum(kept) < len(kept):
            idx = torch.tensor(kept, device=A.device)
            A, B, E = A[idx], B[:, idx], E[idx]
        return {"lora_A": A, "lora_B": B, "lora_E": E}


# ---- training: the regulariser and the rank allocation -------------------------------------------
def adalora_layers(model, adapter_name: str) -> list[tuple[str, AdaLoraAdapter]]:
    """(module path, adapter) of every layer holding AdaLoRA adapter `adapter_name`, in module order."""
    out = []
    for path, layer in model.lora_layers().items():
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if isinstance(adapter, AdaLoraAdapter):
            out.append((path, adapter))
    return out


def orth_regulariser(layers: list[tuple[str, AdaLoraAdapter]]) -> torch.Tensor:
    """peft's term: mean over every lora_A and lora_B of ||P P^T - I||_F (A: A A^T, B: B^T B, both
    [r, r]), summed layer by layer, A before B (peft's parameter order)."""
    total, count = 0, 0
    for _, a in layers:
        for p, cov in ((a.lora_A, a.lora_A @ a.lora_A.T), (a.lora_B, a.lora_B.T @ a.lora_B)):
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    return total / count if count else torch.zeros(())


class RankAllocator:
    """peft's RankAllocator for one trainable AdaLoRA adapter (state: the EMAs of the importance)."""

    def __init__(self, config: AdaLoraConfig, layers: list[tuple[str, AdaLoraAdapter]]):
        self.config = config
        self.paths = [p for p, _ in layers]
        self.init_bgt = sum(a.lora_A.shape[0] for _, a in layers)  # total rank now
        self.target_bgt = config.target_r * len(layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: dict = {}
        self.exp_avg_ipt: dict = {}
        self.exp_avg_unc: dict = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at `step`, whether to mask now): cubic decay between the warm-ups."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff ** 3) + self.target_bgt)
        return budget, step % c.deltaT == 0

    def update_ipt(self, layers) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for path, a in layers:
                for which in ("lora_A", "lora_B", "lora_E"):
                    p = getattr(a, which)
                    if p.grad is None:
                        raise RuntimeError(f"update_and_allocate: {path}.{which} has no gradient. Fix: call it "
                                           f"after loss.backward() and optimizer.step(), before zero_grad().")
                    key = (path, which)
                    if key not in self.ipt:
                        self.exp_avg_ipt[key] = torch.zeros_like(p)
                        self.exp_avg_unc[key] = torch.zeros_like(p)
                    self.ipt[key] = (p * p.grad).abs().detach()
                    self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * self.ipt[key]
                    self.exp_avg_unc[key] = b2 * self.exp_avg_unc[key] + \
                        (1 - b2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs()

    def _score(self, key) -> torch.Tensor:
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def mask_to_budget(self, layers, budget: int) -> dict[str, list[bool]]:
        """Zero E of the least important triplets so that `budget` remain; returns the rank pattern."""
        triplet = {}
        for path, _ in layers:
            score_a = self._score((path, "lora_A")).mean(dim=1, keepdim=True)        # [r, 1]
            score_b = self._score((path, "lora_B")).mean(dim=0).view(-1, 1)          # [r, 1]
            score_e = self._score((path, "lora_E"))                                  # [r, 1]
            triplet[path] = score_e.view(-1) + torch.cat([score_a, score_b], dim=1).sum(dim=1)  # [r]
        k = self.init_bgt - budget
        pattern = {}
        with torch.no_grad():
            if k <= 0:  # nothing to prune (peft's kthvalue would fail on k=0)
                return {f"{p}.lora_E": [True] * a.lora_E.shape[0] for p, a in layers}
            threshold = torch.kthvalue(torch.cat(list(triplet.values())), k=k)[0].item()
            for path, a in layers:
                drop = triplet[path] <= threshold  # [r]
                a.lora_E.masked_fill_(drop.view(-1, 1), 0.0)
                pattern[f"{path}.lora_E"] = (~drop).tolist()
        return pattern

    def mask_using_rank_pattern(self, layers, pattern: dict) -> None:
        with torch.no_grad():
            for path, a in layers:
                kept = torch.tensor(pattern[f"{path}.lora_E"], device=a.lora_E.device).view(-1, 1)
                a.lora_E.masked_fill_(~kept, 0.0)


def update_and_allocate(model, adapter_name: str, global_step: int) -> None:
    """peft's AdaLoraModel.update_and_allocate for `model`'s adapter `adapter_name`: update the
    importance scores and, when the schedule says so, prune to the budget (sets config.rank_pattern)."""
    config = model.peft_config[adapter_name]
    layers = adalora_layers(model, adapter_name)
    allocator = model.__dict__.setdefault("_rank_allocators", {}).get(adapter_name)
    if allocator is None:
        allocator = model.__dict__["_rank_allocators"][adapter_name] = RankAllocator(config, layers)
    end = config.total_step - config.tfinal
    if global_step < end:
        allocator.update_ipt(layers)
        budget, mask_now = allocator.budget_schedule(global_step)
        if mask_now:
            config.rank_pattern = allocator.mask_to_budget(layers, budget)
    elif global_step == end:
        budget, _ = allocator.budget_schedule(global_step)
        config.rank_pattern = allocator.mask_to_budget(layers, budget)
        allocator.reset_ipt()
    elif config.rank_pattern is not None:
        allocator.mask_using_rank_pattern(layers, config.rank_pattern)
