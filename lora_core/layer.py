"""LoraLinear: one flat layer around a frozen base linear layer, holding any number of adapters.

    y = base(x) + sum over active adapters a of  scaling_a * B_a(A_a(dropout_a(x)))

Storage: ONE registry, `adapters: ModuleDict[name -> adapter module]` (`lora_core.adapters` holds
each method's math), plus `active_adapters` (what the forward applies), `merged_adapters` (what is
inside the base weight now), `disabled` and the `kernel` backend name. peft's names read as views:
`layer.lora_A[name]`, `layer.lora_B[name]`, `layer.scaling[name]`, `layer.r[name]`, ... (plain dicts
built on access; change an adapter through `layer.adapters[name]`). Why one module per adapter
instead of peft's dict per attribute: see `lora_core.adapters`.

Forward, three cases:
- exactly one active, unmerged adapter that the fused kernel computes: ONE `kernels.lora_linear`
  call (base + LoRA fused; the fast path, unchanged by multi-adapter support);
- several active adapters: the base once, then each adapter's term in peft's order;
- a mixed batch (`row_adapters` set by `LoraModel(..., adapter_names=[...])`, one name per row of
  x's first dim): the base once for every row, then each adapter's term on its own rows only
  (rows grouped by adapter: gather x's rows, compute the term, add it to those rows in place, as
  peft's `result[rows] += term`); "__base__" rows get nothing. A batch whose rows all name one
  adapter takes the first path. What it costs against one adapter: README, benchmarks/mixed_batch.py.
The last two run the adapter terms in PyTorch whatever the backend (the base still uses it).

bitsandbytes' own forward never runs on a wrapped layer, so its in-place CPU repacking cannot
corrupt the storage we read. Merging is explicit (`merge()` / `unmerge()`), per adapter set,
finite-checked before anything is written, and never triggered by `train()` / `eval()`.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

import kernels

from . import quant
from .adapters import BaseContext, LoraAdapter

BASE_ROW = "__base__"  # peft's name for "no adapter" in a mixed batch
_warned: set[str] = set()  # reasons already reported (once per process)


class LoraLinear(nn.Module):
    """A base linear layer plus named adapters, with peft's attribute names.

    base_layer: nn.Linear | transformers Conv1D | bnb Linear4bit | bnb Linear8bitLt (frozen).
    The other arguments describe the first adapter, named `adapter_name` (more come through
    `add_adapter`). lora_dtype: dtype of lora_A / lora_B (fp32 by default, as peft's
    autocast_adapter_dtype; pass e.g. torch.bfloat16 to keep the LoRA branch in half precision).
    kernel: backend of `kernels.lora_linear` ("auto" | "torch" | "triton"). adapter: a first
    adapter built elsewhere (`lora_core.adapters`), used instead of r / lora_alpha / ... .
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 init_lora_weights: Union[bool, str] = True, use_rslora: bool = False,
                 fan_in_fan_out: bool = False, lora_dtype: torch.dtype = torch.float32, kernel: str = "auto",
                 adapter_name: str = "default", adapter: Optional[nn.Module] = None):
        super().__init__()
        _check_kernel(kernel)
        self.base_layer = base_layer
        self.in_features, self.out_features = quant.in_out_features(base_layer)  # K, N
        self.fan_in_fan_out = fan_in_fan_out
        self.kernel = kernel
        self.adapters = nn.ModuleDict()
        self._active: list[str] = [adapter_name]
        self.merged_adapters: list[str] = []
        self.disabled = False  # set by LoraModel.disable_adapter(): base output only
        self.row_adapters: Optional[list[str]] = None  # a mixed batch's per-row names, while one runs
        if adapter is None:
            adapter = LoraAdapter(self.in_features, self.out_features, r=r, lora_alpha=lora_alpha,
                                  lora_dropout=lora_dropout, init_lora_weights=init_lora_weights,
                                  use_rslora=use_rslora, dtype=lora_dtype, device=_device_of(base_layer))
        self.add_adapter(adapter_name, adapter)

    # ---- the registry --------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter: nn.Module) -> None:
        """Register `adapter` under `name` (not made active: see set_adapter)."""
        if name in self.adapters:
            raise ValueError(f"this layer already holds an adapter named {name!r}")
        self.adapters[name] = adapter

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` (refused while it is merged: its delta is inside the base weight)."""
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into this layer; unmerge() before deleting it")
        if name in self.adapters:
            del self.adapters[name]

    def set_adapter(self, names: Union[str, Sequence[str]]) -> None:
        """The adapters the forward applies, in order (names this layer lacks are skipped there)."""
        self._active = [names] if isinstance(names, str) else list(names)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # peft's per-adapter dicts, as read-only views of the registry
    lora_A = property(lambda self: {n: a.lora_A for n, a in self.adapters.items()})
    lora_B = property(lambda self: {n: a.lora_B for n, a in self.adapters.items()})
    lora_dropout = property(lambda self: {n: a.lora_dropout for n, a in self.adapters.items()})
    scaling = property(lambda self: {n: a.scaling for n, a in self.adapters.items()})
    r = property(lambda self: {n: a.r for n, a in self.adapters.items()})
    lora_alpha = property(lambda self: {n: a.lora_alpha for n, a in self.adapters.items()})
    use_rslora = property(lambda self: {n: a.use_rslora for n, a in self.adapters.items()})

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (model code such as T5's reads `.weight` of its linear layers)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, adapter_names: Optional[Sequence[str]] = None,
                **kwargs) -> torch.Tensor:
        # x [..., K] -> y [..., N]
        if self.disabled:
            return self._base(x)
        rows = adapter_names if adapter_names is not None else self.row_adapters
        if rows is not None:
            return self._mixed_batch(x, rows)
        adapters = self.adapters
        return self._apply_adapters(x, [adapters[n] for n in self._active
                                        if n in adapters and n not in self.merged_adapters])

    def _apply_adapters(self, x: torch.Tensor, todo: list) -> torch.Tensor:
        """base(x) with the adapters in `todo` applied, in order."""
        fused = todo[0].fused_args() if len(todo) == 1 else None
        if fused is not None:
            A, B, scaling, p = fused
            # seed=None: the backend draws the dropout mask itself (torch: from torch's generator,
            # so torch.manual_seed reproduces a run and checkpointing's RNG restore covers it)
            return kernels.lora_linear(x, self._base_record(), quant.base_bias(self.base_layer), A, B,
                                       scaling, p, self.training, backend=self.kernel, seed=None)
        if todo:  # before the base runs: backend "triton" refuses an adapter it cannot fuse
            self._note_torch_terms(x, todo, "several active adapters")
        y = self._base(x)
        if not todo:
            return y
        result = y
        for adapter in todo:
            result = self._call(adapter, x, result, y)
        return result.to(y.dtype)

    def _call(self, adapter, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """adapter(x, result), handing the base (record, bias, base output) to adapters that read it."""
        if getattr(adapter, "needs_base", False):
            ctx = BaseContext(self._base_record(), quant.base_bias(self.base_layer), base_out)
            return adapter(x, result, base=ctx)
        return adapter(x, result)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer alone (merged adapters included), through the layer's backend."""
        return kernels.lora_linear(x, self._base_record(), quant.base_bias(self.base_layer), None, None,
                                   1.0, 0.0, self.training, backend=self.kernel)

    def _mixed_batch(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Row i of x (first dim) gets adapter names[i] only; "__base__" rows the base alone."""
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries but the input has {x.shape[0]} rows "
                             f"(first dimension); pass one adapter name (or '{BASE_ROW}') per row")
        if self.merged_adapters:
            raise ValueError(f"adapter_names given while adapters {self.merged_adapters} are merged into "
                             f"the base weights; call unmerge_adapter() first")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        if len(groups) == 1:  # every row alike: the ordinary path (fused for one LoRA adapter)
            (name,) = groups
            return self._apply_adapters(x, [self.adapters[name]] if name in self.adapters else [])
        todo = [(n, rows) for n, rows in groups.items() if n != BASE_ROW and n in self.adapters]
        if todo:
            self._note_torch_terms(x, [self.adapters[n] for n, _ in todo], "a mixed batch (adapter_names)")
        y = self._base(x)  # [B, ..., N]: one base pass for every row
        for name, rows in todo:
            adapter = self.adapters[name]
            idx = torch.tensor(rows, device=x.device)
            part = x.index_select(0, idx)  # [b, ..., K]
            if getattr(adapter, "term", None) is not None:  # additive: add to its rows in place, as peft's +=
                y.index_add_(0, idx, adapter.term(part).to(y.dtype))
            else:
                rows_y = y.index_select(0, idx)  # [b, ..., N]: these rows' base output
                y.index_copy_(0, idx, self._call(adapter, part, rows_y, rows_y).to(y.dtype))
        return y

    def _note_torch_terms(self, x: torch.Tensor, todo: list, why: str) -> None:
        """Say (once per reason) that these adapters' terms run in PyTorch on a Triton-capable
        backend; refuse with backend "triton" when an adapter's method is not fused at all."""
        if not (self.kernel == "triton" or (self.kernel == "auto" and x.is_cuda)):
            return
        unfused = [a for a in todo if a.fused_args() is None]
        if unfused:
            why = getattr(unfused[0], "unfused_reason", None) or f"{type(unfused[0]).__name__} has no fused path"
            if self.kernel == "triton":
                raise ValueError(f"backend='triton' cannot run this layer: {why}. Use kernel='auto' (the "
                                 f"adapter runs in PyTorch, the base on triton) or 'torch'.")
        reason = f"{why}: the adapter terms run in PyTorch (the base layer runs on the {self.kernel} backend)"
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"LoraLinear: {reason}; one active LoRA adapter runs fused.", stacklevel=3)

    def _base_record(self):
        """The `kernels` record of the base weight, rebuilt only when the base storage changed.

        Rebuilding it (and re-validating it in `kernels`) every forward costs several microseconds
        per layer; `quant.base_weight_key` says when the cached one no longer describes the layer
        (weight or quant_state replaced, `.to()`, merge's re-quantization, bnb's CPU repacking).
        """
        key = quant.base_weight_key(self.base_layer)
        cache = self.__dict__.get("_record_cache")
        if cache is None or cache[0] != key:
            # keep the keyed objects alive with the record (which holds absmax / SCB), so their ids
            # cannot be reused by new objects meanwhile
            cache = (key, quant.base_weight(self.base_layer), self.base_layer.weight,
                     quant.quant_state_or_none(self.base_layer))
            self.__dict__["_record_cache"] = cache
        return cache[1]

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() replace the base storage: drop the cached record now rather than
        # at the next forward (it would otherwise keep the old storage alive until then)
        self.__dict__.pop("_record_cache", None)
        return super()._apply(fn, *args, **kwargs)

    # ---- merge -----------------------------------------------------------------------------------
    def delta_weight(self, adapter_names: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Sum of the named adapters' deltas (default: the active ones this layer holds), fp32,
        laid out [N, K] like W (fan_in_fan_out only changes how W is stored)."""
        names = self._held(self._active if adapter_names is None else adapter_names)
        total = torch.zeros(self.out_features, self.in_features, device=_device_of(self.base_layer))
        for name in names:
            total = total + self.adapters[name].delta_weight()
        return total

    def merge(self, adapter_names: Optional[Sequence[str]] = None) -> float:
        """Add the deltas of `adapter_names` (default: the active adapters) into the base weight;
        returns the max |stored W - (W + deltas)|.

        Adapters already merged are skipped with a warning (no double add). Nothing is written
        unless every delta and the merged weight are finite. For 4-bit / int8 bases the sum is
        re-quantized, so the result (and a later unmerge) carries the quantization error, which
        the return value reports.
        """
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of names, got {adapter_names!r}")
        wanted = self._held(self._active if adapter_names is None else adapter_names)
        todo = [n for n in wanted if n not in self.merged_adapters]
        if len(todo) < len(wanted):
            warnings.warn(f"LoraLinear.merge(): {[n for n in wanted if n not in todo]} already merged; "
                          f"{'merging ' + str(todo) if todo else 'nothing done'} (no double add).")
        if not todo:
            return 0.0
        err = self._apply_deltas(todo, +1)
        self.merged_adapters += todo
        return err

    def unmerge(self) -> float:
        """Subtract every merged delta again (last merged first). Exact up to rounding for dense
        bases; for quantized bases W comes back within about one quantization step (lossy)."""
        if not self.merged_adapters:
            warnings.warn("LoraLinear.unmerge(): not merged; nothing done.")
            return 0.0
        err = self._apply_deltas(list(reversed(self.merged_adapters)), -1)
        self.merged_adapters = []
        return err

    def _held(self, names: Sequence[str]) -> list[str]:
        return [n for n in names if n in self.adapters]

    def merge_problem(self, names: Sequence[str]) -> Optional[str]:
        """Why merging `names` into this layer would be refused (None: it can be merged)."""
        bad = [n for n in names if not torch.isfinite(self.adapters[n].delta_weight()).all()]
        if bad:
            return (f"LoRA delta (scaling * B @ A) of adapter {bad} has non-finite values; refusing to merge "
                    f"(fix: check the adapter weights for NaN/inf).")
        with_bias = [n for n in names if getattr(self.adapters[n], "delta_bias", lambda: None)() is not None]
        if with_bias and self.bias is None:
            return (f"adapter {with_bias} has lora_bias=True but this layer's base has no bias to merge it "
                    f"into; refusing to merge, as peft does (fix: keep it unmerged).")
        return None

    def _apply_deltas(self, names: list[str], sign: int) -> float:
        with torch.no_grad():
            problem = self.merge_problem(names)
            if problem:
                raise ValueError(f"{problem} The base weight is unchanged.")
            deltas = [self.adapters[n].delta_weight() for n in names]  # each [N, K] fp32
            scaled = [n for n in {*self.merged_adapters, *names} if getattr(self.adapters[n], "needs_base", False)]
            if scaled:  # DoRA among the merged: the merge depends on the base itself
                target = self._scaled_target(names, deltas, sign)
                quant.requantize_into(self.base_layer, _checked(target))
            elif quant.is_quantized(self.base_layer):
                # one re-quantization for the whole set: each one is lossy
                target = quant.dequantize_base(self.base_layer)  # [N, K] fp32
                for d in deltas:
                    target = target + sign * d
                _check_finite(target)
                quant.requantize_into(self.base_layer, target)
            else:
                w = self.base_layer.weight  # [N, K], or [K, N] when fan_in_fan_out (Conv1D)
                new, target = w, w.float()
                for d in deltas:
                    d = d.T if self.fan_in_fan_out else d
                    target = target + sign * d
                    # per adapter, W + delta summed in fp32 and rounded once to the base dtype, as
                    # peft does in fp32 (in bf16 / fp16 peft rounds the delta first: two roundings)
                    new = (new.float() + sign * d).to(w.dtype)
                _check_finite(new)
                w.data.copy_(new)
                if self.fan_in_fan_out:
                    target = target.T
            for n in names:  # lora_bias: the bias gets scaling * b (peft's merge of lora_B.bias)
                db = self.adapters[n].delta_bias()
                if db is not None:
                    self.bias.data.copy_((self.bias.float() + sign * db).to(self.bias.dtype))
            return (quant.dequantize_base(self.base_layer) - target).abs().max().item()

    def _scaled_target(self, names: list[str], deltas: list[torch.Tensor], sign: int) -> torch.Tensor:
        """The new W [N, K] fp32 when a merged adapter scales the base (DoRA's merge_scale f).

        With W0 the base without merged adapters and M the merged set, the stored weight is
            W = S * (W0 + sum_m (f_m / S) delta_m),   S = 1 + sum_m (f_m - 1)   (rows; f = 1 for LoRA)
        which equals the unmerged forward, W0 + sum_m ((f_m - 1) W0 + f_m delta_m), for any set and
        order (peft's sequential f * (W + delta) scales adapters merged before a DoRA one too). With
        one DoRA adapter alone this is peft's f * (W0 + delta) exactly (f / f = 1). The factors f
        are computed from W0 when merging and kept for the unmerge (peft keeps the weight norm).
        """
        scales: dict = self.__dict__.setdefault("_merge_scales", {})  # name -> f [N], while merged
        merged = list(self.merged_adapters)
        merged_deltas = [self.adapters[n].delta_weight() for n in merged]
        W = quant.dequantize_base(self.base_layer)                       # [N, K] fp32, as stored
        ones = torch.ones(self.out_features, device=W.device)
        f = [scales.get(n, ones) for n in merged]
        S = 1 + sum(fi - 1 for fi in f) if f else ones                   # [N]
        W0 = W / S[:, None] - sum((fi / S)[:, None] * d for fi, d in zip(f, merged_deltas)) if merged else W
        if sign < 0:  # unmerge everything: back to W0
            for n in names:
                scales.pop(n, None)
            return W0
        for n, d in zip(names, deltas):
            fn = self.adapters[n].merge_scale(W0) if getattr(self.adapters[n], "needs_base", False) else None
            if fn is not None:
                scales[n] = fn
            merged.append(n)
            merged_deltas.append(d)
        f = [scales.get(n, ones) for n in merged]
        S = 1 + sum(fi - 1 for fi in f)
        return S[:, None] * (W0 + sum((fi / S)[:, None] * d for fi, d in zip(f, merged_deltas)))


def _checked(w: torch.Tensor) -> torch.Tensor:
    _check_finite(w)
    return w


def _check_finite(w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        raise ValueError("merged weight would have non-finite values (overflow in the base dtype); "
                         "refusing to merge. The base weight is unchanged.")


def _check_kernel(name: str) -> None:
    if name not in kernels.BACKENDS:
        raise ValueError(f"kernel={name!r}: unknown backend. Fix: use one of {list(kernels.BACKENDS)}.")


def _device_of(layer: nn.Module) -> Optional[torch.device]:
    for p in layer.parameters():
        return p.device
    return None
