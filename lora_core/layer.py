"""LoraLinear: one flat layer around a frozen base linear layer, holding any number of adapters.

    y = base(x) + sum over active adapters a of  scaling_a * B_a(A_a(dropout_a(x)))

Storage: ONE registry, `adapters: ModuleDict[name -> adapter module]` (`lora_core.adapters` holds
each method's math), plus `active_adapters` (what the forward applies), `merged_adapters` (what is
inside the base weight now), `disabled` and the `backend` name. peft's names read as views:
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
The last two run the adapter terms in PyTorch whatever the backend (the base still uses it), and so
does one adapter of a method the fused kernel cannot compute (IA3's scale, a bottleneck adapter's
activation: `adapter.kernel_reason`), which backend "triton" refuses with that reason. Input-side
methods (IA3 on a feed-forward layer, a serial bottleneck adapter) transform x before the base.

bitsandbytes' own forward never runs on a wrapped layer, so its in-place CPU repacking cannot
corrupt the storage we read. Merging is explicit (`merge()` / `unmerge()`), per adapter set,
finite-checked before anything is written, and never triggered by `train()` / `eval()`.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

import kernels

from . import quant
from .adapters import BaseContext, LoraAdapter, merged_weight

BASE_ROW = "__base__"  # peft's name for "no adapter" in a mixed batch
_warned: set[str] = set()  # reasons already reported (once per process)


class LoraLinear(nn.Module):
    """A base linear layer plus named adapters, with peft's attribute names.

    base_layer: nn.Linear | transformers Conv1D | bnb Linear4bit | bnb Linear8bitLt (frozen).
    The other arguments describe the first adapter, named `adapter_name` (more come through
    `add_adapter`). lora_dtype: dtype of lora_A / lora_B (fp32 by default, as peft's
    autocast_adapter_dtype; pass e.g. torch.bfloat16 to keep the LoRA branch in half precision).
    backend: backend of `kernels.lora_linear` ("auto" | "torch" | "triton"; `kernel=` is its old,
    deprecated name). adapter: a first
    adapter built elsewhere (`lora_core.adapters`), used instead of r / lora_alpha / ... .
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 init_lora_weights: Union[bool, str] = True, use_rslora: bool = False,
                 fan_in_fan_out: bool = False, lora_dtype: torch.dtype = torch.float32, backend: str = "auto",
                 adapter_name: str = "default", adapter: Optional[nn.Module] = None, kernel: Optional[str] = None):
        super().__init__()
        backend = resolve_backend(backend, kernel, type(self).__name__)
        self.base_layer = base_layer
        self.in_features, self.out_features = quant.in_out_features(base_layer)  # K, N
        self.fan_in_fan_out = fan_in_fan_out
        self.backend = backend
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

    @property
    def kernel(self) -> str:
        """Deprecated name of `backend` (reading and setting still work, with a FutureWarning)."""
        warnings.warn("LoraLinear.kernel is deprecated: use .backend", FutureWarning, stacklevel=2)
        return self.backend

    @kernel.setter
    def kernel(self, name: str) -> None:
        warnings.warn("LoraLinear.kernel is deprecated: use .backend", FutureWarning, stacklevel=2)
        self.backend = resolve_backend(name, None, "LoraLinear")

    # peft's per-adapter dicts, as read-only views of the registry (adapters of the methods that
    # have the attribute: `ia3_l` for IA3, `lora_E` for AdaLoRA, ...)
    lora_A = property(lambda self: self._view("lora_A"))
    lora_B = property(lambda self: self._view("lora_B"))
    lora_dropout = property(lambda self: self._view("lora_dropout"))
    scaling = property(lambda self: self._view("scaling"))
    r = property(lambda self: self._view("r"))
    lora_alpha = property(lambda self: self._view("lora_alpha"))
    use_rslora = property(lambda self: self._view("use_rslora"))
    lora_E = property(lambda self: self._view("lora_E"))
    ranknum = property(lambda self: self._view("ranknum"))
    ia3_l = property(lambda self: self._view("ia3_l"))

    def _view(self, attr: str) -> dict:
        return {n: getattr(a, attr) for n, a in self.adapters.items() if hasattr(a, attr)}

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
                                       scaling, p, self.training, backend=self.backend, seed=None)
        if len(todo) == 1:
            self._check_backend_computes(todo[0], x)
        xb = x
        for adapter in todo:  # input-side methods (IA3 feed-forward, a serial input adapter)
            if hasattr(adapter, "transform_input"):
                xb = adapter.transform_input(xb)
        y = self._base(xb)
        if not todo:
            return y
        if len(todo) > 1:
            self._note_torch_terms(x, "several active adapters")
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
                                   1.0, 0.0, self.training, backend=self.backend)

    def _mixed_batch(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Row i of x (first dim) gets adapter names[i] only; "__base__" rows the base alone."""
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries but the input has {x.shape[0]} rows "
                             f"(first dimension); pass one adapter name (or '{BASE_ROW}') per row")
        if self.merged_adapters:
            raise ValueError(f"adapter_names given while adapters {self.merged_adapters} are merged into "
                             f"the base weights; call unmerge_adapter() first")
        groups = row_groups(names, x.device)
        if len(groups) == 1:  # every row alike: the ordinary path (fused for one LoRA adapter)
            (name,) = groups
            return self._apply_adapters(x, [self.adapters[name]] if name in self.adapters else [])
        y = self._base(x)  # [B, ..., N]: one base pass for every row
        todo = [(n, idx) for n, idx in groups.items() if n != BASE_ROW and n in self.adapters]
        if todo:
            self._note_torch_terms(x, "a mixed batch (adapter_names)")
        for name, idx in todo:
            adapter = self.adapters[name]
            part = x.index_select(0, idx)  # [b, ..., K]
            if getattr(adapter, "term", None) is not None:  # additive: add to its rows in place, as peft's +=
                y.index_add_(0, idx, adapter.term(part).to(y.dtype))
            elif hasattr(adapter, "transform_input"):  # the base itself sees other inputs on these rows
                y.index_copy_(0, idx, self._apply_adapters(part, [adapter]).to(y.dtype))
            else:
                rows_y = y.index_select(0, idx)  # [b, ..., N]: these rows' base output
                y.index_copy_(0, idx, self._call(adapter, part, rows_y, rows_y).to(y.dtype))
        return y

    def _check_backend_computes(self, adapter: nn.Module, x: torch.Tensor) -> None:
        """One adapter the fused kernel cannot take: refused on "triton" when the kernels cannot
        compute its method at all (`kernel_reason`), noted once on "auto" with a GPU input."""
        reason = getattr(adapter, "kernel_reason", None)
        if reason is None:
            self._note_torch_terms(x, f"{getattr(adapter, 'method', 'this')} adapters (not fused)")
        elif self.backend == "triton":
            raise ValueError(f"backend='triton' cannot run this {adapter.method} adapter: {reason}. Fix: "
                             f"model.set_backend('auto') (base on triton where it can, the adapter in PyTorch) "
                             f"or 'torch'.")
        else:
            self._note_torch_terms(x, f"{adapter.method} adapter: {reason}")

    def _note_torch_terms(self, x: torch.Tensor, why: str) -> None:
        if self.backend == "triton" or (self.backend == "auto" and x.is_cuda):
            reason = f"{why}: the adapter terms run in PyTorch (the base layer runs on the {self.backend} backend)"
            if reason not in _warned:
                _warned.add(reason)
                warnings.warn(f"LoraLinear: {reason}; one active adapter runs fused.", stacklevel=3)

    def _base_record(self):
        """The `kernels` record of the base weight, rebuilt only when the base storage changed.

        Rebuilding it (and re-validating it in `kernels`) every forward costs several microseconds
        per layer; `quant.base_weight_key` says when the cached one no longer describes the layer
        (weight or quant_state replaced, `.to()`, merge's re-quantization, bnb's CPU repacking).
        Under torch.compile the record is built while tracing instead (it costs nothing at run
        time there): Dynamo guards on every attribute it read, so a replaced weight or quant state
        recompiles, and the key's data pointers, which Dynamo cannot read, are not needed.
        """
        if torch.compiler.is_compiling():
            return quant.base_weight(self.base_layer)
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

    def mergeable(self, names: Sequence[str]) -> bool:
        """False if any named adapter's merge input is non-finite; ValueError for a method that
        cannot be merged at all (a bottleneck adapter's nonlinearity)."""
        ok = True
        for name in self._held(names):
            adapter = self.adapters[name]
            refusal = getattr(adapter, "merge_refusal", None)
            if getattr(adapter, "lora_bias", False) and self.bias is None:
                refusal = ("it has lora_bias=True but this layer's base has no bias to merge it into (peft "
                           "refuses too). Fix: keep it unmerged")
            if refusal:
                raise ValueError(f"adapter {name!r} cannot be merged: {refusal}")
            if hasattr(adapter, "merge_into") or getattr(adapter, "needs_base", False):
                ok &= all(bool(torch.isfinite(p).all()) for p in adapter.parameters())
            else:
                ok &= bool(torch.isfinite(adapter.delta_weight()).all())
        return ok

    def _apply_deltas(self, names: list[str], sign: int) -> float:
        with torch.no_grad():
            adapters = [self.adapters[n] for n in names]
            bad = [n for n in names if not self.mergeable([n])]
            if bad:
                raise ValueError(f"the merge of adapter {bad} has non-finite values (e.g. LoRA's scaling * B @ A); "
                                 f"refusing to merge. The base weight is unchanged. Fix: check the "
                                 f"adapter weights for NaN/inf.")
            if any(getattr(self.adapters[n], "needs_base", False) for n in {*self.merged_adapters, *names}):
                # DoRA among the merged: the merge depends on the base itself
                target = self._scaled_target(names, sign)
                _check_finite(target)
                new_bias = self._merged_bias(adapters, sign)
                quant.requantize_into(self.base_layer, target)
            elif quant.is_quantized(self.base_layer):
                # one re-quantization for the whole set: each one is lossy
                target = quant.dequantize_base(self.base_layer)  # [N, K] fp32
                for a in adapters:
                    target = merged_weight(a, target, sign)
                _check_finite(target)
                new_bias = self._merged_bias(adapters, sign)
                quant.requantize_into(self.base_layer, target)
            else:
                w = self.base_layer.weight  # [N, K], or [K, N] when fan_in_fan_out (Conv1D)
                nk = (lambda m: m.T) if self.fan_in_fan_out else (lambda m: m)  # stored <-> [N, K]
                new, target = w, w.float()
                for a in adapters:
                    target = nk(merged_weight(a, nk(target), sign))
                    # per adapter, W + delta summed in fp32 and rounded once to the base dtype, as
                    # peft does in fp32 (in bf16 / fp16 peft rounds the delta first: two roundings)
                    new = nk(merged_weight(a, nk(new.float()), sign)).to(w.dtype)
                _check_finite(new)
                new_bias = self._merged_bias(adapters, sign)
                w.data.copy_(new)
                target = nk(target)
            if new_bias is not None:
                self.base_layer.bias.data.copy_(new_bias)
            return (quant.dequantize_base(self.base_layer) - target).abs().max().item()

    def _scaled_target(self, names: list[str], sign: int) -> torch.Tensor:
        """The new W [N, K] fp32 when a merged adapter scales the base (DoRA's merge_scale f).

        With W0 the base without merged adapters and M the merged set, the stored weight is
            W = S * (W0 + sum_m (f_m / S) delta_m),   S = 1 + sum_m (f_m - 1)   (rows; f = 1 for LoRA)
        which equals the unmerged forward, W0 + sum_m ((f_m - 1) W0 + f_m delta_m), for any set and
        order (peft's sequential f * (W + delta) scales adapters merged before a DoRA one too). With
        one DoRA adapter alone this is peft's f * (W0 + delta) exactly (f / f = 1). The factors f
        are computed from W0 when merging and kept for the unmerge (peft keeps the weight norm).
        """
        other = [n for n in {*self.merged_adapters, *names} if hasattr(self.adapters[n], "merge_into")]
        if other:
            raise ValueError(f"adapters {other} merge by scaling W (IA3): merging them on one layer together "
                             f"with a DoRA adapter is not supported. Fix: merge one kind at a time.")
        scales: dict = self.__dict__.setdefault("_merge_scales", {})  # name -> f [N], while merged
        merged = list(self.merged_adapters)
        deltas = [self.adapters[n].delta_weight() for n in merged]        # [N, K] fp32 each
        W = quant.dequantize_base(self.base_layer)                       # [N, K] fp32, as stored
        ones = torch.ones(self.out_features, device=W.device)
        f = [scales.get(n, ones) for n in merged]
        S = 1 + sum(fi - 1 for fi in f) if f else ones                   # [N]
        W0 = W / S[:, None] - sum((fi / S)[:, None] * d for fi, d in zip(f, deltas)) if merged else W
        if sign < 0:  # unmerge everything: back to W0
            for n in names:
                scales.pop(n, None)
            return W0
        for n in names:
            adapter = self.adapters[n]
            if getattr(adapter, "needs_base", False):
                scales[n] = adapter.merge_scale(W0)
            merged.append(n)
            deltas.append(adapter.delta_weight())
        f = [scales.get(n, ones) for n in merged]
        S = 1 + sum(fi - 1 for fi in f)
        return S[:, None] * (W0 + sum((fi / S)[:, None] * d for fi, d in zip(f, deltas)))

    def _merged_bias(self, adapters: list, sign: int) -> Optional[torch.Tensor]:
        """The base bias with the adapters' bias changes (IA3's output scale), None if none applies."""
        b = getattr(self.base_layer, "bias", None)
        if b is None or not any(hasattr(a, "merge_bias") for a in adapters):
            return None
        new = b
        for a in adapters:
            if hasattr(a, "merge_bias"):
                new = a.merge_bias(new.float(), sign).to(b.dtype)
        _check_finite(new)
        return new


def _check_finite(w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        raise ValueError("merged weight would have non-finite values (overflow in the base dtype); "
                         "refusing to merge. The base weight is unchanged.")


def row_groups(names: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """A mixed batch's rows per adapter name, {name: row indices [b] int64 on `device`}, in order of
    first appearance. Every wrapped layer of one forward (and every decode step of a generate) asks
    with the same names: memoised, so the index tensors are copied to the device once."""
    return _row_groups(tuple(names), device)


@functools.lru_cache(maxsize=16)
def _row_groups(names: tuple, device: torch.device) -> dict[str, torch.Tensor]:
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        rows.setdefault(name, []).append(i)
    return {name: torch.tensor(r, device=device) for name, r in rows.items()}


def resolve_backend(backend: str, kernel: Optional[str], where: str) -> str:
    """The backend name to use, checked. `kernel` is the argument's old name (one word, `backend`,
    everywhere now): still accepted, with a FutureWarning, so older scripts keep running."""
    if kernel is not None:
        warnings.warn(f"{where}(kernel=...) is deprecated: use backend=...", FutureWarning, stacklevel=3)
        backend = kernel
    if backend not in kernels.BACKENDS:
        raise ValueError(f"backend={backend!r}: unknown backend. Fix: use one of {list(kernels.BACKENDS)}.")
    return backend


def _device_of(layer: nn.Module) -> Optional[torch.device]:
    for p in layer.parameters():
        return p.device
    return None
