"""Peak memory of one training step, from the allocator's own events, and what it is made of.

`measure_step(model, optimizer, batch, lora_layers)` runs zero_grad + forward + backward +
optimizer.step() once under the PyTorch profiler with `profile_memory=True`, which records every
allocation and free the tensor allocator makes (pointer, size, time), temporaries inside operators
included. From them:
  start      bytes of the tensors alive when the step begins: weights, optimizer state, the batch
             (unique storages, counted from the objects);
  peak       start + the largest sum of bytes allocated during the step and not yet freed;
  breakdown  what was alive at that moment: weights, optimizer state, gradients, saved activations
             (what autograd keeps for backward), other (temporaries, outputs, the batch);
  saved      bytes autograd saved for backward (through `saved_tensors_hooks`: unique storages,
             weights and optimizer state excluded), in all and per LoRA layer.
The figure counts allocated bytes, not pages of the process, so it does not depend on what ran
before in the same process (the peak-RSS delta it replaces read 0 after a warm-up: the C allocator
reused pages freed by earlier steps). `cuda_peaks` is the CUDA caching allocator's own view.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

CATEGORIES = ("weights", "optimizer state", "gradients", "saved activations", "other")
HOW = ("allocator events of one optimizer step (torch.profiler profile_memory): live tensor bytes "
       "at the peak, and the peak above the level at the step's start")
# Names of the profiler ranges around the three parts of the step; `peak_phase` is one of PHASES.
PHASES = ("forward", "backward", "optimizer step")
_RANGE = "compare.memory: "


@dataclass
class StepMemory:
    """Memory of one training step, in bytes (see the module docstring for each field)."""

    start_bytes: int
    peak_bytes: int
    peak_phase: str
    breakdown: dict = field(default_factory=dict)  # category -> bytes alive at the peak
    saved_bytes: int = 0
    saved_per_layer: dict = field(default_factory=dict)  # LoRA layer path -> bytes saved inside it

    @property
    def step_bytes(self) -> int:
        """Peak above the level at the start: what the step itself needs on top of weights and state."""
        return self.peak_bytes - self.start_bytes

    def to_dict(self) -> dict:
        return {"start_bytes": self.start_bytes, "peak_bytes": self.peak_bytes,
                "step_bytes": self.step_bytes, "peak_phase": self.peak_phase,
                "breakdown_bytes": dict(self.breakdown), "saved_bytes": self.saved_bytes,
                "saved_per_layer_bytes": dict(self.saved_per_layer)}


def _storages(tensors: Iterable) -> dict[int, int]:
    """{storage data pointer: storage bytes} of the tensors, each storage once (views share one);
    an FSDP shard (DTensor) counts this process's part."""
    from torch.distributed.tensor import DTensor

    out = {}
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            if s.nbytes() > 0:
                out[s.data_ptr()] = s.nbytes()
    return out


def _weight_tensors(model) -> Iterable[torch.Tensor]:
    """Parameters, buffers and the tensors bitsandbytes keeps beside a quantized parameter
    (Int8Params' CB/SCB attributes; a 4-bit QuantState's absmax, code and nested state2)."""
    yield from model.parameters()
    yield from model.buffers()
    for p in model.parameters():
        holders = [p, getattr(p, "quant_state", None)]
        holders.append(getattr(holders[1], "state2", None))
        for h in holders:
            if h is not None:
                yield from (v for v in vars(h).values() if isinstance(v, torch.Tensor))


def _optimizer_tensors(optimizer) -> Iterable[torch.Tensor]:
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


class SavedTensors:
    """While active: what autograd saves for backward, attributed to the innermost LoRA layer.

    `saved`: {storage pointer: bytes} of every saved tensor; `per_layer`: {layer path: {pointer:
    bytes}} of those saved while that layer's forward ran. Weights and optimizer state (pointers
    in `exclude`) are saved by reference, not activations, and are left out of both.
    """

    def __init__(self, lora_layers: Mapping[str, torch.nn.Module], exclude: Mapping[int, int]):
        self.layers, self.exclude = lora_layers, exclude
        self.saved: dict[int, int] = {}
        self.per_layer: dict[str, dict[int, int]] = {name: {} for name in lora_layers}
        self._stack: list[str] = []
        self._handles: list = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        for ptr, n in _storages([t]).items():
            if ptr not in self.exclude:
                self.saved[ptr] = n
                if self._stack:
                    self.per_layer[self._stack[-1]][ptr] = n
        # detach: what autograd stores must not refer back to a tensor whose grad_fn holds it
        # (a reference cycle, see saved_tensors_hooks); it shares the storage, so nothing is copied.
        return t.detach()

    def __enter__(self) -> "SavedTensors":
        def leave(module, args, out) -> None:  # a forward hook's return value would replace `out`
            self._stack.pop()

        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(
                lambda module, args, name=name: self._stack.append(name)))
            self._handles.append(module.register_forward_hook(leave))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _allocations(prof, device: torch.device) -> tuple[list[tuple[int, int, int]], dict[str, tuple[int, int]]]:
    """([(time ns, pointer, +bytes allocated / -bytes freed)] on `device`, in time order,
    {phase: (start ns, end ns)} of the ranges measure_step opened)."""
    try:
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError as e:  # the event tree is torch's own (torch.profiler._memory_profiler reads it)
        raise RuntimeError(f"this torch's profiler has no allocation event tree ({e})") from None
    events, ranges, todo = [], {}, list(roots)
    index = device.index
    if index is None and device.type == "cuda":
        index = torch.cuda.current_device()
    while todo:
        e = todo.pop()
        todo.extend(e.children)
        if e.name.startswith(_RANGE):
            ranges[e.name[len(_RANGE):]] = (e.start_time_ns, e.start_time_ns + e.duration_time_ns)
        f = e.extra_fields
        if type(f).__name__ == "_ExtraFields_Allocation" and f.device.type == device.type \
                and (device.type == "cpu" or f.device.index == index):
            events.append((e.start_time_ns, f.ptr, f.alloc_size))
    events.sort(key=lambda ev: (ev[0], -ev[2]))  # same nanosecond: the allocation first
    return events, ranges


def measure_step(model, optimizer, batch: Mapping, lora_layers: Mapping[str, torch.nn.Module]
                 ) -> StepMemory:
    """One zero_grad + forward + backward + optimizer.step() of `model` on `batch`, measured.

    `lora_layers`: {path: module} whose forward gets the saved-tensor bytes attributed to it.
    The step really runs (the optimizer moves the weights), as in the timed repetitions.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    # Kineto prints its start/stop stages to stderr unless told otherwise (read at its first use).
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    device = next(p.device for p in model.parameters())
    optimizer.zero_grad(set_to_none=True)  # no gradient from an earlier step counts as "start"
    weights = _storages(_weight_tensors(model))
    state = _storages(_optimizer_tensors(optimizer))
    start = {**_storages(batch.values()), **weights, **state}
    saved = SavedTensors(lora_layers, exclude={**weights, **state})
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function(_RANGE + "forward"), saved:
            loss = model(**batch).loss
        with record_function(_RANGE + "backward"):
            loss.backward()
        del loss
        with record_function(_RANGE + "optimizer step"):
            optimizer.step()
    events, ranges = _allocations(prof, device)
    grads = _storages(p.grad for p in model.parameters() if p.grad is not None)
    state_end = _storages(_optimizer_tensors(optimizer))

    # The step's own allocations alive at its peak and at its end: {pointer: (bytes, event index)}.
    (end, _), peak, peak_at = _replay(events, len(events))
    (at_peak, pre_freed), _, _ = _replay(events, peak_at + 1)
    forward_end = ranges.get("forward", (0, 0))[1]

    def category(ptr: int, i: int) -> str:
        survives = end.get(ptr, (0, -1))[1] == i  # this very allocation is still alive at the end
        if ptr in grads and survives:
            return "gradients"
        if ptr in state_end and survives:
            return "optimizer state"
        if ptr in saved.saved and events[i][0] <= forward_end:  # not a later reuse of that address
            return "saved activations"
        return "other"

    breakdown = dict.fromkeys(CATEGORIES, 0)
    for ptr, n in start.items():
        if ptr not in pre_freed:
            breakdown["weights" if ptr in weights else "optimizer state" if ptr in state else "other"] += n
    for ptr, (n, i) in at_peak.items():
        breakdown[category(ptr, i)] += n
    peak_t = events[peak_at][0] if peak_at >= 0 else 0
    phase = next((p for p in PHASES if p in ranges and ranges[p][0] <= peak_t <= ranges[p][1]), "")
    start_bytes = sum(start.values())
    return StepMemory(start_bytes=start_bytes, peak_bytes=start_bytes + peak, peak_phase=phase,
                      breakdown=breakdown, saved_bytes=sum(saved.saved.values()),
                      saved_per_layer={k: sum(v.values()) for k, v in saved.per_layer.items()})


def _replay(events: list[tuple[int, int, int]], stop: int):
    """Replay events[:stop]: ((live, pre_freed), peak, peak index).

    live: {pointer: (bytes, event index)} of the allocations made in the window and not freed;
    pre_freed: pointers of blocks from before the window that it freed (the event carries their
    size, which lowers the running sum; the CPU allocator reports no such frees, so there a block
    from before the step counts as alive throughout). peak: the running sum's maximum over the
    window (0 and index -1 when it never rose above the start).
    """
    live, pre_freed = {}, set()
    cur, peak, peak_at = 0, 0, -1
    for i, (_, ptr, n) in enumerate(events[:stop]):
        if n > 0:
            live[ptr] = (n, i)
            cur += n
        elif ptr in live:
            cur -= live.pop(ptr)[0]
        else:
            pre_freed.add(ptr)
            cur += n
        if cur > peak:
            peak, peak_at = cur, i
    return (live, pre_freed), peak, peak_at


def cuda_peaks(fn: Callable[[], None]) -> dict[str, int]:
    """The CUDA caching allocator's peaks during `fn`, above their levels before it, in bytes.

    Cached blocks are released first and the peaks reset, so an earlier variant's cache cannot
    lend this one memory: "reserved" is what the allocator had to take from the device.
    """
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    fn()
    torch.cuda.synchronize()
    return {"allocated_bytes": torch.cuda.max_memory_allocated() - allocated,
            "reserved_bytes": torch.cuda.max_memory_reserved() - reserved}
