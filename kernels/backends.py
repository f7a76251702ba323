"""The backends of `kernels.lora_linear`, and the choice between them.

A backend is a named object that takes a validated `LoraCall` (kernels/call.py):
    reason(call) -> str | None   why it cannot run this call (None: it can)
    run(call)    -> y [M, N]     the output, with autograd wired
and, when `run` goes through `kernels.autograd.LoraFunction`, its forward(ctx, call) and
backward(ctx, g). Two exist:
    "torch"   TORCH: PyTorch ops (kernels/torch_ops.py), any device, any call; dropout drawn as
              peft draws it (torch's generator).
    "triton"  TRITON: the fused Triton kernels (kernels/triton/), CUDA tensors (or CPU under Triton's
              interpreter, TRITON_INTERPRET=1); Philox dropout (reference.dropout_mask).
`choose` maps the `backend=` word to one: "torch" and "triton" as asked ("triton" raises with the
reason when it cannot), "auto" the Triton backend when the inputs are on CUDA and it takes the
call, else the torch backend, saying why in one stderr line once per reason per process.
Inside the triton backend each pass picks a strategy (kernels/triton/strategy.py); `report()`
lists, per call shape, the backend and strategy that ran and why.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

import torch

from . import torch_ops
from .autograd import LoraFunction
from .call import SEED_END, LoraCall
from .formats import DenseWeight
from .triton import interpreting

BACKEND_NAMES = ("auto", "torch", "triton")


class Backend:
    """One way to run a LoraCall; see the module doc. Subclasses set `name`."""

    name = ""

    def reason(self, call: LoraCall) -> Optional[str]:
        raise NotImplementedError

    def run(self, call: LoraCall) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<kernels backend {self.name!r}>"


class TorchBackend(Backend):
    """PyTorch ops, recording peft's own graph (kernels/torch_ops.py): what it saves for backward is
    what peft's saves (x or dropout(x) in the LoRA dtype, the dropout noise, u [M, r]), never the
    dequantized W of a quantized base."""

    name = "torch"

    def reason(self, call: LoraCall) -> Optional[str]:
        return None  # takes every valid call

    def run(self, call: LoraCall) -> torch.Tensor:
        return torch_ops.lora_forward(call)


class TritonBackend(Backend):
    """The fused kernels (kernels/triton/launch.py), imported on first use. Saves x, u [M, r] and the
    dropout seed (a 1-element device tensor); the kernels regenerate the mask from it."""

    name = "triton"
    _launch = None  # kernels.triton.launch once imported; a str: why it cannot be

    def reason(self, call: LoraCall) -> Optional[str]:
        device = call.x.device
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            return (f"inputs on {device.type}, the triton kernels need CUDA tensors (on CPU tensors Triton "
                    "runs only in its interpreter: TRITON_INTERPRET=1 before triton is imported)")
        launch = self._module()
        if isinstance(launch, str):
            return launch
        if (isinstance(call.weight, DenseWeight) and call.weight.weight.requires_grad
                and torch.is_grad_enabled()):
            return "the dense base weight requires grad, and the fused backward computes no weight gradient"
        return launch.reason(call)

    def run(self, call: LoraCall) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the launchers behind an operator Dynamo can record (kernels/ops.py)
            from .ops import triton_lora

            return triton_lora(call, _seed_tensor(call.seed, call.x.device) if call.dropout_p else None)
        return LoraFunction.apply(call.x, call.A, call.B, call.bias, call, self)

    def forward(self, ctx, call: LoraCall) -> torch.Tensor:
        seed = None
        if call.dropout_p:
            seed = _seed_tensor(call.seed, call.x.device)
        y, u = self._launch.forward(call, seed)  # [..., N], [M, r] fp32
        ctx.save_for_backward(call.x, u, call.A, call.B, seed)
        return y

    def backward(self, ctx, g: torch.Tensor):
        x, u, A, B, seed = ctx.saved_tensors
        return self._launch.backward(g, x, u, ctx.weight, A, B, ctx.scaling, ctx.dropout_p, seed,
                                     needs_dx=ctx.needs_input_grad[0])

    def _module(self):
        if TritonBackend._launch is None:
            try:
                from .triton import launch
                TritonBackend._launch = launch
            except ImportError as e:  # triton not installed (or broken)
                TritonBackend._launch = f"the Triton kernels cannot be imported ({type(e).__name__}: {e})"
        return TritonBackend._launch


def _seed_tensor(seed: Optional[int], device: torch.device) -> torch.Tensor:
    """The Philox seed as an int64 [1] tensor on `device`, without a host sync: an explicit seed is
    filled in; otherwise it is drawn there from torch's generator for that device, so a CUDA-graph
    replay draws a new one (graph-safe RNG) and activation checkpointing, which restores the RNG
    state before recomputing, draws the same one again."""
    if seed is not None:
        return torch.full((1,), seed, dtype=torch.int64, device=device)
    return torch.randint(0, SEED_END - 1, (1,), dtype=torch.int64, device=device)


TORCH = TorchBackend()
TRITON = TritonBackend()
_warned: set[str] = set()  # fallback reasons already reported on stderr


def choose(name: str, call: LoraCall) -> Backend:
    """The backend for one call. Raises ValueError when backend='triton' cannot take it."""
    if name == "torch":
        record("forward", "torch", "torch", "backend='torch'", _shape(call))
        return TORCH
    why = TRITON.reason(call) if name == "triton" else auto_reason(call)
    if why is None:
        return TRITON
    if name == "triton":
        raise ValueError(f"backend='triton' cannot run this call: {why}. "
                         "Use backend='auto' to fall back to the torch backend.")
    _say_fallback(why)
    record("forward", "torch", "torch", why, _shape(call))
    return TORCH


@torch.compiler.assume_constant_result
def _say_fallback(why: str) -> None:
    """Once per reason per process, one plain line: on a CPU machine this is expected, not a
    problem, and a warning with a source line reads as one. Under torch.compile Dynamo runs this
    while tracing (assume_constant_result) instead of splitting the graph at the print: the line
    appears when the layer compiles."""
    if why not in _warned:
        _warned.add(why)
        print(f"kernels: backend 'auto' uses torch ({why})", file=sys.stderr, flush=True)


MAX_REPORT = 1000  # distinct call shapes recorded per process
_report: dict = {}  # (pass, backend, strategy, M, N, K, r, format) -> entry


def record(pass_: str, backend: str, strategy: str, why: str, call_shape: tuple, predicted_us=None) -> None:
    """Count one pass of one call shape (M, N, K, r, format) under the backend and strategy that ran it
    (`report`); the first time a shape gets its strategy, one line on the "kernels" logger (INFO).
    Not while torch.compile traces (its logger call would be a graph break in every layer): the
    torch backend's compiled calls are not counted; the Triton backend's are, from inside its
    operators (kernels/ops.py), which run eagerly."""
    if torch.compiler.is_compiling():
        return
    key = (pass_, backend, strategy) + call_shape
    entry = _report.get(key)
    if entry is None:
        if len(_report) >= MAX_REPORT:
            return
        M, N, K, r, fmt = call_shape
        entry = {"pass": pass_, "backend": backend, "strategy": strategy, "why": why, "M": M, "N": N, "K": K,
                 "r": r, "format": fmt, "calls": 0, "predicted_us": None if predicted_us is None else dict(predicted_us)}
        _report[key] = entry
        logging.getLogger("kernels").info("kernels: %s M=%d N=%d K=%d r=%d %s -> %s backend, %s (%s)", pass_, M, N,
                                          K, r, fmt, backend, strategy, why)
    entry["calls"] += 1


def report() -> list[dict]:
    """What ran in this process: per (pass, call shape, backend, strategy) its count, why, and (triton)
    every strategy's predicted H100 time in us. The torch backend records its forward only (autograd
    runs its backward). At most MAX_REPORT shapes."""
    return [dict(e) for e in _report.values()]


def reset_report() -> None:
    _report.clear()


def _shape(call: LoraCall) -> tuple:
    """(M, N, K, r, format name) of a call, for the report."""
    M = call.x.numel() // call.K if call.K else 0
    return (M, call.N, call.K, call.r, type(call.weight).__name__.replace("Weight", "").lower())


def auto_reason(call: LoraCall) -> Optional[str]:
    """Why backend='auto' does not pick the Triton backend for this call (None: it does)."""
    if call.x.device.type != "cuda":  # auto never picks Triton's CPU interpreter
        return ("no CUDA device" if not torch.cuda.is_available()
                else f"inputs on {call.x.device.type}, the triton kernels need CUDA tensors")
    return TRITON.reason(call)


def reset_warnings() -> None:
    """Forget which fallback reasons were reported (for tests)."""
    _warned.clear()
