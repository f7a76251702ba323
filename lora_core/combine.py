"""add_weighted_adapter: a new adapter from a weighted combination of existing ones (peft's numbers).

Combination types (peft 0.21's names and formulas, tested equal to peft):

    cat            A = [w_1 s_1 A_1; w_2 s_2 A_2; ...] (stacked rows), B = [B_1, B_2, ...]: exact,
                   rank = sum of the ranks
    linear, ties, dare_linear, dare_ties, magnitude_prune
                   A and B combined separately, A_i weighted by sign(w_i s_i) sqrt|w_i s_i| and
                   B_i by sqrt|w_i s_i|: an approximation of the weighted sum of deltas (all ranks
                   equal)
    svd and <type>_svd
                   the weighted deltas s_i B_i A_i [N, K] combined by <type> (svd: a plain weighted
                   sum), then truncated to `svd_rank` by SVD: B = U S, A = V^T, optionally clamped
                   to the `svd_clamp` quantile

where, on tensors t_i stacked on a new first dim with weights w_i:
    task arithmetic  sum_i w_i t_i
    magnitude prune  keep the int(density * numel) largest |t_i|, zero the rest, then sum_i w_i t_i
    ties             magnitude prune each t_i; elect a sign per element (sign of sum_i t_i, or of
                     sum_i sign(t_i) with majority_sign_method="frequency"); average the weighted
                     t_i that agree with it
    dare             keep each element with probability density (torch.bernoulli), divide by density;
                     dare_linear then sums, dare_ties elects signs as ties

Random draws (dare) come from torch's default generator in peft's order (layers in module order;
per layer every A, then every B; or one delta per adapter for *_svd), so the same seed gives
peft's numbers. The new adapter gets r = lora_alpha = its rank (scaling 1), no rank/alpha
pattern, targets the union of the sources', and is frozen and not active, as in peft.

Where we differ from peft, on purpose: an existing name is refused (peft silently does nothing);
use_rslora is switched off for the new adapter (peft keeps it, so its scaling r / sqrt(r) =
sqrt(r) multiplies the combination by sqrt(r)); bias is "none" (a second adapter with bias is
refused anyway); a modules_to_save copy starts from the source adapter's trained copy (peft
copies the untrained original).
"""
from __future__ import annotations

import math
import operator
import warnings
from functools import reduce

import torch

from .config import DATA_INITS, init_kind
from .embedding import LoraEmbedding
from .inject import ModulesToSave

LINEAR_FAMILY = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_FAMILY = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat",) + LINEAR_FAMILY + SVD_FAMILY
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


# ---- the merge functions, on tensors t_i stacked as [n, ...] ----------------------------------------
def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def magnitude_prune_one(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest |t| elements, zero the others."""
    keep = torch.zeros_like(t).reshape(-1)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)[1]] = 1
    return t * keep.reshape(t.shape)


def random_prune_one(t: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each element with probability density, then rescale by 1 / density."""
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def _pruned(tensors: list[torch.Tensor], density: float, how) -> list[torch.Tensor]:
    if density >= 1:
        warnings.warn(f"density={density} >= 1: nothing is pruned.")
        return tensors
    if density < 0:
        raise ValueError(f"density={density}: must be >= 0")
    return [how(t, density) for t in tensors]


def _elect_and_average(stacked: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    """TIES: per element, the majority sign of the (unweighted) stack, then the mean of the weighted
    entries with that sign (entries of the other sign, and zeros, are left out)."""
    if method == "total":
        magnitude = stacked.sum(dim=0)
    elif method == "frequency":
        magnitude = stacked.sign().sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method={method!r}: use 'total' or 'frequency'")
    agree = stacked.sign() == torch.where(magnitude >= 0, 1, -1)
    return (_weighted(stacked, weights) * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def combine(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density, method: str) -> torch.Tensor:
    """One combination of same-shape tensors (kind without the _svd suffix)."""
    if kind in ("linear", "svd"):
        return _weighted(torch.stack(tensors, dim=0), weights).sum(dim=0)
    if kind == "magnitude_prune":
        return _weighted(torch.stack(_pruned(tensors, density, magnitude_prune_one)), weights).sum(dim=0)
    if kind == "dare_linear":
        return _weighted(torch.stack(_pruned(tensors, density, random_prune_one)), weights).sum(dim=0)
    if kind == "ties":
        return _elect_and_average(torch.stack(_pruned(tensors, density, magnitude_prune_one)), weights, method)
    if kind == "dare_ties":
        return _elect_and_average(torch.stack(_pruned(tensors, density, random_prune_one)), weights, method)
    raise ValueError(f"unknown combination kind {kind!r}")


# ---- the model-level method ----------------------------------------------------------------------
def add_weighted_adapter(model, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank=None, svd_clamp=None,
                         svd_full_matrices: bool = True, svd_driver=None, density=None,
                         majority_sign_method: str = "total") -> None:
    """See the module docstring. Everything is checked before the model changes."""
    kind, rank, targets = _check(model, adapters, weights, adapter_name, combination_type, svd_rank, density)
    layers = {p: layer for p, layer in model.lora_layers().items() if any(a in layer.adapters for a in adapters)}
    config = model.peft_config[adapters[0]].copy()
    config.r, config.lora_alpha, config.target_modules = rank, rank, targets
    config.rank_pattern, config.alpha_pattern = {}, {}
    config.use_rslora, config.bias = False, "none"
    if init_kind(config.init_lora_weights) in DATA_INITS:
        # the new adapter must not rewrite the base again (peft's copy of the config would)
        config.init_lora_weights, config.loftq_config = True, {}
    config.modules_to_save = sorted(model.modules_to_save or []) or None
    copy_from = {}  # modules_to_save path -> the source adapter's trained copy
    for path, m in model.base_model.named_modules():
        if isinstance(m, ModulesToSave):
            src = next((a for a in adapters if a in m.modules_to_save), None)
            copy_from[path] = m.modules_to_save[src] if src is not None else m.original_module
    before = [(p, p.requires_grad) for p in model.parameters()]
    model._inject(adapter_name, config, copy_from=copy_from, targets=list(layers))
    for p, flag in before:
        p.requires_grad_(flag)
    with torch.no_grad():
        for path, layer in layers.items():  # module order: the order peft draws dare's masks in
            new = layer.adapters[adapter_name]
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapters]
            if kind == "cat":
                A, B = _cat(layer, present)
            elif kind in SVD_FAMILY:
                A, B = _svd(layer, present, kind, rank, density, majority_sign_method, svd_clamp,
                            svd_full_matrices, svd_driver)
            else:
                A, B = _linear_family(layer, present, kind, density, majority_sign_method)
            new.lora_A.weight.zero_()
            new.lora_B.weight.zero_()
            new.lora_A.weight[: A.shape[0]] = A  # [r', K] into [r, K]; rows past r' stay zero
            new.lora_B.weight[:, : B.shape[1]] = B
    for p in (q for layer in layers.values() for q in layer.adapters[adapter_name].parameters()):
        p.requires_grad_(False)  # frozen, as peft


def _cat(layer, present):
    # peft's order of products: (A * w) * s
    A = torch.cat([layer.adapters[a].lora_A.weight * w * layer.adapters[a].scaling for a, w in present], dim=0)
    B = torch.cat([layer.adapters[a].lora_B.weight for a, _ in present], dim=1)
    return A, B  # [sum r, K], [N, sum r]


def _linear_family(layer, present, kind, density, method):
    wa, wb = [], []
    for a, w in present:
        ws = w * layer.adapters[a].scaling
        wa.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))  # the sign on one side only
        wb.append(math.sqrt(abs(ws)))
    As = [layer.adapters[a].lora_A.weight for a, _ in present]
    Bs = [layer.adapters[a].lora_B.weight for a, _ in present]
    dtype = As[0].dtype
    A = combine(kind, As, torch.tensor(wa).to(As[0].device), density, method)
    B = combine(kind, Bs, torch.tensor(wb).to(Bs[0].device), density, method)
    return A.to(dtype), B.to(dtype)


def _svd(layer, present, kind, rank, density, method, clamp, full_matrices, driver):
    deltas = [layer.adapters[a].delta_weight() for a, _ in present]  # [N, K] each, scaling included
    w = torch.tensor([w for _, w in present]).to(deltas[0].device)
    delta = combine(kind.removesuffix("_svd"), deltas, w, density, method)  # [N, K]
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    U = U[:, :rank] @ torch.diag(S[:rank])  # [N, r]
    Vh = Vh[:rank, :]                        # [r, K]
    if clamp is not None:
        hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    return Vh, U


def _check(model, adapters, weights, adapter_name, combination_type, svd_rank, density):
    """(kind, new rank, new target_modules), or a ValueError naming the problem."""
    from .model import _check_adapter_name
    _check_adapter_name(adapter_name)
    model._check_known(adapters)
    if not adapters:
        raise ValueError("adapters is empty: name at least one adapter to combine")
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights: pass one weight per adapter")
    if adapter_name in model.peft_config:
        raise ValueError(f"an adapter named {adapter_name!r} already exists (peft would silently keep it "
                         f"unchanged). Fix: pick a new name or delete_adapter({adapter_name!r}) first.")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r}: use one of {list(COMBINATION_TYPES)}")
    kind = "linear" if len(adapters) == 1 else combination_type  # peft: one adapter -> linear
    if kind.removesuffix("_svd") in NEEDS_DENSITY and density is None:
        raise ValueError(f"combination_type={combination_type!r} needs density (the fraction of values "
                         f"kept, in [0, 1])")
    embedded = [p for p, m in model.lora_layers().items()
                if isinstance(m, LoraEmbedding) and any(a in m.adapters for a in adapters)]
    if embedded:
        raise ValueError(f"{embedded[0]} is an embedding layer: combining Embedding LoRA adapters is not "
                         f"implemented in lorafuse. Fix: combine adapters that target linear layers only.")
    for m in model.base_model.modules():
        if isinstance(m, ModulesToSave) and sum(a in m.modules_to_save for a in adapters) > 1:
            raise ValueError("two of these adapters have their own copy of the same modules_to_save module; "
                             "those cannot be combined (as in peft)")
    configs = [model.peft_config[a] for a in adapters]
    variant = [a for a, c in zip(adapters, configs) if c.use_dora or c.lora_bias]
    if variant:
        raise ValueError(f"adapters {variant} use DoRA or lora_bias: their effect is not a low-rank "
                         f"delta B @ A alone (a magnitude vector / a bias), so a combination would drop "
                         f"part of it. Fix: combine plain LoRA adapters.")
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if kind in LINEAR_FAMILY:
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type={kind!r} needs adapters of one rank, got ranks {ranks}. "
                             f"Fix: use 'cat' or 'svd'.")
        rank = ranks[0]
    elif kind == "cat":
        rank = sum(ranks)
    else:
        rank = svd_rank or max(ranks)
    kinds = {type(c.target_modules) for c in configs}
    if len(kinds) != 1:
        raise ValueError("the adapters' target_modules mix lists and regex strings; they cannot be combined")
    if kinds == {str}:
        targets = "|".join(f"({c.target_modules})" for c in configs)
    else:
        targets = reduce(operator.or_, (set(c.target_modules) for c in configs))
    return kind, rank, targets
