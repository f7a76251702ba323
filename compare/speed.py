"""`python -m compare speed`: ours (each backend available here) against peft, interleaved in one process.

Per variant it times three things on the same rotating batches:
  forward          = training-mode forward (graph recorded, dropout 0)
  forward+backward = that plus loss.backward()
  optimizer step   = zero_grad + forward + backward + AdamW.step()
After warm-up, every repetition runs each variant once, in an order that rotates, so drift of the
machine (other processes, frequency) spreads over all variants alike. On CUDA, times come from CUDA
events and peak memory from the caching allocator; on CPU, wall time (perf_counter) and the peak
resident set size during one optimizer step (high-water mark reset through /proc/self/clear_refs).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .models import CompareError, ModelSpec, build_pair, example_batch, lora_params
from .report import table
from .equivalence import no_dropout

PHASES = ("forward", "forward+backward", "optimizer step")


@dataclass
class Variant:
    """One contender: a model, its backend name, and whether it runs here (else why not)."""

    name: str
    model: object = None
    kernel: Optional[str] = None
    skipped: str = ""
    opt: object = None
    times: dict = field(default_factory=lambda: {p: [] for p in PHASES})
    cpu_times: dict = field(default_factory=lambda: {p: [] for p in PHASES})  # process CPU seconds
    peak_mem: Optional[float] = None  # bytes


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(median, p10, p90) of a list of times."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), q[0], q[-1]


class _Timer:
    """Times a callable: CUDA events on GPU (synchronised), perf_counter on CPU.

    Returns (seconds, CPU seconds of this process). On a CPU shared with other jobs the wall time
    includes time spent descheduled; the process CPU time does not, so it is the steadier measure
    of the work done (it sums over torch's threads).
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn: Callable[[], None]) -> tuple[float, float]:
        c = time.process_time()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3, time.process_time() - c
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t, time.process_time() - c


def _rss_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024  # kB -> bytes
    return out


def peak_memory(fn: Callable[[], None], cuda: bool) -> tuple[Optional[float], str]:
    """(peak bytes above the level before `fn`, how it was measured); None when it cannot be.

    CPU: resets the kernel's RSS high-water mark, runs fn, reads VmHWM - VmRSS(before). Memory that
    the allocator reuses from its free lists does not show, so small models read near zero.
    """
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base), "cuda max_memory_allocated - allocated before"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
        before = _rss_status()["VmRSS"]
        fn()
        # max(0, .): the kernel's RSS counters are updated lazily, so a step that allocates nothing
        # new can read a few pages below the level before it.
        return float(max(0, _rss_status()["VmHWM"] - before)), "peak RSS delta (VmHWM after clear_refs)"
    except OSError as e:
        return None, f"peak RSS unavailable here ({e})"


def run_speed(spec: ModelSpec, steps: int = 20, warmup: int = 3, n_batches: int = 4,
              progress: Optional[Callable[[str], None]] = None, lora_dropout: float = 0.0) -> dict:
    """Measure every variant; return a JSON-able dict with per-phase median/p10/p90 and ratios.

    The base model's own dropouts are off on both sides; `lora_dropout` is the LoRA branch's rate,
    set alike on ours and peft's (the recipes train with 0.05), so its cost is in the timings.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps} warmup={warmup}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout={lora_dropout}: must be in [0, 1)")
    say = progress or (lambda msg: None)
    cuda = torch.cuda.is_available()
    base_spec = ModelSpec(**{**vars(spec), "kernel": "torch"})
    base_spec.validate()
    say("building ours and peft")
    pair = build_pair(base_spec)
    variants = [Variant("ours-torch", pair.ours, "torch")]
    if cuda:
        try:
            import triton  # noqa: F401
            variants.append(Variant("ours-triton", pair.ours, "triton"))
        except ImportError as e:
            variants.append(Variant("ours-triton", skipped=f"triton not importable: {e}"))
    else:
        variants.append(Variant("ours-triton", skipped="no CUDA: Triton runs only in its interpreter "
                                                         "on CPU, whose timings say nothing"))
    variants.append(Variant("peft", pair.peft))
    live = [v for v in variants if not v.skipped]
    for v in live:
        no_dropout(v.model)
        v.model.train()
    if lora_dropout > 0:
        set_lora_dropout(pair.keymap, lora_dropout)
    # The two ours variants share one model (set_kernel switches), so they share one optimizer.
    opts = {}
    for v in live:
        key = id(v.model)
        if key not in opts:
            opts[key] = torch.optim.AdamW(lora_params(v.model), lr=1e-5)
        v.opt = opts[key]
    batches = [example_batch(pair.ours.base_model, spec, seed=10 + i) for i in range(n_batches)]
    tokens = spec.batch * spec.seq
    timer = _Timer(cuda)

    def phases(v: Variant, b: dict) -> dict[str, Callable[[], None]]:
        def fwd():
            v.model(**b)

        def fwd_bwd():
            v.model(**b).loss.backward()

        def step():
            v.opt.zero_grad(set_to_none=True)
            v.model(**b).loss.backward()
            v.opt.step()
        return {"forward": fwd, "forward+backward": fwd_bwd, "optimizer step": step}

    for v in list(live):  # a backend that cannot take this model here is listed, not fatal
        if v.kernel is None:
            continue
        try:
            v.model.set_kernel(v.kernel)
            phases(v, batches[0])["optimizer step"]()
        except (NotImplementedError, ValueError, RuntimeError, ImportError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            v.skipped = f"kernel {v.kernel!r} cannot run this model here: {msg}"
            live.remove(v)
        finally:
            v.model.zero_grad(set_to_none=True)
    if not any(v.kernel for v in live):
        raise CompareError("none of our backends could run this model here: "
                           + "; ".join(f"{v.name}: {v.skipped}" for v in variants if v.skipped))

    say(f"timing {', '.join(v.name for v in live)}: {warmup} warm-up + {steps} repetitions")
    for i in range(warmup + steps):
        b = batches[i % n_batches]
        order = live[i % len(live):] + live[:i % len(live)]  # rotate who goes first
        for v in order:
            if v.kernel:
                v.model.set_kernel(v.kernel)
            for name, fn in phases(v, b).items():
                dt, cpu = timer(fn)
                if i >= warmup:
                    v.times[name].append(dt)
                    v.cpu_times[name].append(cpu)
            v.model.zero_grad(set_to_none=True)

    mem_how = ""
    for v in live:
        if v.kernel:
            v.model.set_kernel(v.kernel)
        v.peak_mem, mem_how = peak_memory(phases(v, batches[0])["optimizer step"], cuda)
        v.model.zero_grad(set_to_none=True)

    peft_v = next(v for v in variants if v.name == "peft")
    peft_med = {p: _quantiles(peft_v.times[p])[0] for p in PHASES}
    peft_min = {p: min(peft_v.times[p]) for p in PHASES}
    peft_cpu = {p: statistics.median(peft_v.cpu_times[p]) for p in PHASES}
    result = {"device": torch.cuda.get_device_name() if cuda else _cpu_name(),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "spec": vars(spec), "lora_dropout": lora_dropout, "steps": steps, "warmup": warmup, "tokens_per_step": tokens,
              "memory": mem_how, "timer": "cuda events" if cuda else "perf_counter wall time",
              "variants": []}
    for v in variants:
        entry = {"name": v.name, "skipped": v.skipped}
        if not v.skipped:
            for p in PHASES:
                med, lo, hi = _quantiles(v.times[p])
                mn, cpu = min(v.times[p]), statistics.median(v.cpu_times[p])
                entry[p] = {"median_s": med, "p10_s": lo, "p90_s": hi, "min_s": mn, "cpu_median_s": cpu,
                            "ratio_to_peft": med / peft_med[p] if peft_med[p] > 0 else None,
                            "min_ratio_to_peft": mn / peft_min[p] if peft_min[p] > 0 else None,
                            "cpu_ratio_to_peft": cpu / peft_cpu[p] if peft_cpu[p] > 0 else None}
            entry["tokens_per_s"] = tokens / entry["optimizer step"]["median_s"]
            entry["peak_mem_bytes"] = v.peak_mem
        result["variants"].append(entry)
    return result


def set_lora_dropout(keymap: dict, p: float) -> None:
    """The same LoRA dropout rate on both sides: ours (LoraLinear) and peft's (lora.LoraLayer)."""
    for mine, theirs in keymap.values():
        mine.adapters["default"].lora_dropout = torch.nn.Dropout(p)
        theirs.lora_dropout["default"] = torch.nn.Dropout(p)


def _cpu_name() -> str:
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {name}, {os.cpu_count()} cores visible"


def format_speed(result: dict) -> str:
    """Aligned table, one row per variant and phase: median [p10, p90], min, ratios to peft."""
    headers = ["variant", "phase", "median ms", "p10 ms", "p90 ms", "min ms", "ratio", "ratio(min)",
               "cpu ms", "ratio(cpu)", "tokens/s", "peak MiB"]
    rows = []
    for v in result["variants"]:
        if v["skipped"]:
            rows.append([v["name"], "skipped"] + [""] * (len(headers) - 2))
            continue
        for p in PHASES:
            d = v[p]
            last = p == PHASES[-1]
            mem = v["peak_mem_bytes"]
            rows.append([v["name"], p, d["median_s"] * 1e3, d["p10_s"] * 1e3, d["p90_s"] * 1e3,
                         d["min_s"] * 1e3, d["ratio_to_peft"], d["min_ratio_to_peft"],
                         d["cpu_median_s"] * 1e3, d["cpu_ratio_to_peft"],
                         v["tokens_per_s"] if last else "",
                         (None if mem is None else mem / 2**20) if last else ""])
    s = result["spec"]
    head = (f"speed vs peft: model={s['model']} quantization={s['quantization']} dtype={s['dtype']} "
            f"r={s['r']} lora_dropout={result['lora_dropout']} batch={s['batch']}x{s['seq']} "
            f"({result['tokens_per_step']} tokens/step), "
            f"{result['steps']} reps after {result['warmup']} warm-up, interleaved\n"
            f"device: {result['device']}; torch {result['torch']}, {result['threads']} threads; "
            f"timer: {result['timer']}")
    notes = ["ratio = ours / peft (below 1 = ours faster) of the median wall time, of the minimum, and "
             "of the median process CPU time (cpu ms: time actually computing, all threads; steadier "
             "than wall time on a shared machine); tokens/s from the median optimizer step; "
             f"peak memory: {result['memory']}"]
    notes += [f"{v['name']}: skipped ({v['skipped']})" for v in result["variants"] if v["skipped"]]
    return "\n".join([head, table(headers, rows)] + notes)
