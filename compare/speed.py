"""`python -m compare speed`: ours (each backend available here) against peft, interleaved in one process.

Per variant it times three things on the same rotating batches:
  forward          = training-mode forward (graph recorded, dropout 0)
  forward+backward = that plus loss.backward()
  optimizer step   = zero_grad + forward + backward + AdamW.step()
After warm-up, every repetition runs each variant once, in an order that rotates, so drift of the
machine (other processes, frequency) spreads over all variants alike. On CUDA, times come from CUDA
events; on CPU, wall time (perf_counter) and process CPU time.

With `compile=True` (`--compile`) each variant runs as `torch.compile(model)` (Inductor, mode as
given), so the table compares compiled ours against compiled peft; the first optimizer step,
which compiles, is timed apart and reported as the compile time (minus a steady step). Memory is
then not measured: its saved-tensor hooks would change what is compiled.

Memory, after the timing, one more optimizer step per variant (`compare.memory.measure_step`): the
allocator's own events under torch.profiler give the live tensor bytes at the step's peak, what they
are (weights, optimizer state, gradients, saved activations, other) and what autograd saved per
LoRA layer. It counts bytes, not pages, so it does not depend on which variant ran first. On CUDA
the caching allocator's peaks (allocated and reserved, reset per variant) are reported beside it.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

import kernels.backends

from . import memory
from .equivalence import no_dropout
from .models import CompareError, ModelSpec, build_pair, example_batch, lora_params
from .report import table

PHASES = ("forward", "forward+backward", "optimizer step")
VARIANTS = ("ours-torch", "ours-triton", "peft")


@dataclass
class Variant:
    """One contender: a model, its backend name, and whether it runs here (else why not)."""

    name: str
    model: object = None
    backend: Optional[str] = None
    skipped: str = ""
    layers: dict = field(default_factory=dict)  # {path: this side's LoRA layer}
    opt: object = None
    times: dict = field(default_factory=lambda: {p: [] for p in PHASES})
    cpu_times: dict = field(default_factory=lambda: {p: [] for p in PHASES})  # process CPU seconds
    memory: Optional[memory.StepMemory] = None
    cuda_memory: Optional[dict] = None  # memory.cuda_peaks
    run: Optional[Callable] = None  # what a phase calls: the model, or torch.compile(model)
    first_step: tuple[float, float] = (0.0, 0.0)  # (wall s, CPU s) of the first optimizer step


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


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def run_speed(spec: ModelSpec, steps: int = 20, warmup: int = 3, n_batches: int = 4,
              progress: Optional[Callable[[str], None]] = None, lora_dropout: float = 0.0,
              variants: Optional[Sequence[str]] = None, compile: bool = False,
              compile_mode: str = "default") -> dict:
    """Measure every variant; return a JSON-able dict with per-phase median/p10/p90 and ratios,
    and each variant's memory (`compare.memory.StepMemory.to_dict()` under "memory"; None when
    compiled). `compile`: time `torch.compile(model, mode=compile_mode)` on every side instead;
    each variant's "compile_s" is its first optimizer step less its median one (wall time).

    The base model's own dropouts are off on both sides; `lora_dropout` is the LoRA branch's rate,
    set alike on ours and peft's (the recipes train with 0.05), so its cost is in the timings.
    `variants`: which of VARIANTS to run (peft and at least one of ours), in the order the first
    repetition and the memory steps run them; default: all.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps} warmup={warmup}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout={lora_dropout}: must be in [0, 1)")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={compile_mode!r}: one of {', '.join(COMPILE_MODES)}")
    names = list(VARIANTS if variants is None else variants)
    if (any(n not in VARIANTS for n in names) or len(set(names)) != len(names) or "peft" not in names
            or len(names) < 2):
        raise ValueError(f"variants={names}: peft and one or both of ours, each at most once "
                         f"(from {', '.join(VARIANTS)})")
    say = progress or (lambda msg: None)
    cuda = torch.cuda.is_available()
    base_spec = ModelSpec(**{**vars(spec), "backend": "torch"})
    base_spec.validate()
    say("building ours and peft")
    kernels.backends.reset_report()  # what ran, per layer shape: result["backends"]
    pair = build_pair(base_spec)
    ours_layers = {path: mine for path, (mine, _) in pair.keymap.items()}
    peft_layers = {path: theirs for path, (_, theirs) in pair.keymap.items()}
    made = {"ours-torch": Variant("ours-torch", pair.ours, "torch", layers=ours_layers),
            "peft": Variant("peft", pair.peft, layers=peft_layers)}
    if cuda:
        try:
            import triton  # noqa: F401
            made["ours-triton"] = Variant("ours-triton", pair.ours, "triton", layers=ours_layers)
        except ImportError as e:
            made["ours-triton"] = Variant("ours-triton", skipped=f"triton not importable: {e}")
    else:
        made["ours-triton"] = Variant("ours-triton", skipped="no CUDA: Triton runs only in its interpreter "
                                                             "on CPU, whose timings say nothing")
    variants = [made[n] for n in names]
    live = [v for v in variants if not v.skipped]
    for v in live:
        no_dropout(v.model)
        v.model.train()
    if compile:
        import torch._dynamo as dynamo

        dynamo.reset()  # nothing compiled earlier in this process counts
        # the two ours variants share one model, hence one wrapper: Dynamo keeps a compiled graph
        # per backend (it guards on the layer's backend name), so switching recompiles only once
        wrapped = {}
        for v in live:
            if id(v.model) not in wrapped:
                wrapped[id(v.model)] = torch.compile(v.model, mode=None if compile_mode == "default" else compile_mode)
            v.run = wrapped[id(v.model)]
    else:
        for v in live:
            v.run = v.model
    if lora_dropout > 0:
        set_lora_dropout(pair.keymap, lora_dropout)
    # The two ours variants share one model (set_backend switches), so they share one optimizer.
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
            v.run(**b)

        def fwd_bwd():
            v.run(**b).loss.backward()

        def step():
            v.opt.zero_grad(set_to_none=True)
            v.run(**b).loss.backward()
            v.opt.step()
        return {"forward": fwd, "forward+backward": fwd_bwd, "optimizer step": step}

    # the first optimizer step of each variant, timed apart (with compile=True, it compiles); a
    # backend that cannot take this model here is listed, not fatal
    say("first optimizer step of each variant" + (" (compiling)" if compile else ""))
    for v in list(live):
        try:
            if v.backend:
                v.model.set_backend(v.backend)
            v.first_step = timer(phases(v, batches[0])["optimizer step"])
        except (NotImplementedError, ValueError, RuntimeError, ImportError) as e:
            if v.backend is None:
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            v.skipped = f"backend {v.backend!r} cannot run this model here: {msg}"
            live.remove(v)
        finally:
            v.model.zero_grad(set_to_none=True)
    if not any(v.backend for v in live):
        raise CompareError("none of our backends could run this model here: "
                           + "; ".join(f"{v.name}: {v.skipped}" for v in variants if v.skipped))

    say(f"timing {', '.join(v.name for v in live)}: {warmup} warm-up + {steps} repetitions")
    for i in range(warmup + steps):
        b = batches[i % n_batches]
        order = live[i % len(live):] + live[:i % len(live)]  # rotate who goes first
        for v in order:
            if v.backend:
                v.model.set_backend(v.backend)
            for name, fn in phases(v, b).items():
                dt, cpu = timer(fn)
                if i >= warmup:
                    v.times[name].append(dt)
                    v.cpu_times[name].append(cpu)
            v.model.zero_grad(set_to_none=True)

    say("memory: " + ("not measured with compile" if compile else "one more optimizer step each, under the profiler"))
    for v in ([] if compile else live):
        if v.backend:
            v.model.set_backend(v.backend)
        v.memory = memory.measure_step(v.model, v.opt, batches[0], v.layers)
        if cuda:
            v.cuda_memory = memory.cuda_peaks(phases(v, batches[0])["optimizer step"])
        v.model.zero_grad(set_to_none=True)

    peft_v = next(v for v in variants if v.name == "peft")
    peft_med = {p: _quantiles(peft_v.times[p])[0] for p in PHASES}
    peft_min = {p: min(peft_v.times[p]) for p in PHASES}
    peft_cpu = {p: statistics.median(peft_v.cpu_times[p]) for p in PHASES}
    result = {"device": torch.cuda.get_device_name() if cuda else _cpu_name(),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "spec": vars(spec), "lora_dropout": lora_dropout, "steps": steps, "warmup": warmup, "tokens_per_step": tokens,
              "compile": compile_mode if compile else None,
              "memory": memory.HOW, "timer": "cuda events" if cuda else "perf_counter wall time",
              "cuda_memory": ("caching allocator peaks during one optimizer step above the levels "
                              "before it, after empty_cache and a peak reset") if cuda else None,
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
            entry["first_step_s"], entry["first_step_cpu_s"] = v.first_step
            entry["compile_s"] = (v.first_step[0] - entry["optimizer step"]["median_s"]) if compile else None
            entry["memory"] = None if v.memory is None else v.memory.to_dict()
            if v.cuda_memory is not None:
                entry["cuda_memory"] = v.cuda_memory
        result["variants"].append(entry)
    result["backends"] = backends_that_ran(pair.ours)
    return result


def backends_that_ran(model) -> list[dict]:
    """One entry per (backend, pass, strategy) that ran in our model's LoRA layers during the run
    (LoraModel.backend_report): the layer shapes, the row counts M seen, the calls, and why."""
    groups: dict = {}
    for e in model.backend_report():
        g = groups.setdefault((e["backend"], e["pass"], e["strategy"]),
                              {"backend": e["backend"], "pass": e["pass"], "strategy": e["strategy"], "why": e["why"],
                               "shapes": set(), "M": set(), "calls": 0})
        g["shapes"].add(f"{e['K']}->{e['N']}")
        g["M"].add(e["M"])
        g["calls"] += e["calls"]
    return [{**g, "shapes": sorted(g["shapes"]), "M": sorted(g["M"])} for g in groups.values()]


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


def format_speed(result: dict, breakdown: bool = False) -> str:
    """Aligned tables: one row per variant and phase (median [p10, p90], min, ratios to peft), then
    one row per variant of memory; with `breakdown`, what the peak is made of and the bytes saved
    for backward per kind of LoRA layer."""
    headers = ["variant", "phase", "median ms", "p10 ms", "p90 ms", "min ms", "ratio", "ratio(min)",
               "cpu ms", "ratio(cpu)", "tokens/s"]
    rows = []
    for v in result["variants"]:
        if v["skipped"]:
            rows.append([v["name"], "skipped"] + [""] * (len(headers) - 2))
            continue
        for p in PHASES:
            d = v[p]
            rows.append([v["name"], p, d["median_s"] * 1e3, d["p10_s"] * 1e3, d["p90_s"] * 1e3,
                         d["min_s"] * 1e3, d["ratio_to_peft"], d["min_ratio_to_peft"],
                         d["cpu_median_s"] * 1e3, d["cpu_ratio_to_peft"],
                         v["tokens_per_s"] if p == PHASES[-1] else ""])
    s = result["spec"]
    head = (f"speed vs peft: model={s['model']} quantization={s['quantization']} dtype={s['dtype']} "
            f"r={s['r']} lora_dropout={result['lora_dropout']} batch={s['batch']}x{s['seq']} "
            f"({result['tokens_per_step']} tokens/step), "
            f"{result['steps']} reps after {result['warmup']} warm-up, interleaved\n"
            f"device: {result['device']}; torch {result['torch']}, {result['threads']} threads; "
            f"timer: {result['timer']}")
    notes = ["ratio = ours / peft (below 1 = ours faster) of the median wall time, of the minimum, and "
             "of the median process CPU time (cpu ms: time actually computing, all threads; steadier "
             "than wall time on a shared machine); tokens/s from the median optimizer step"]
    notes += [f"{v['name']}: skipped ({v['skipped']})" for v in result["variants"] if v["skipped"]]
    notes += [f"ran: {g['backend']} backend, {g['pass']} -> {g['strategy']} ({g['why']}): {g['calls']} calls, "
              f"layers {', '.join(g['shapes'])}, M in {g['M']}" for g in result.get("backends", [])]
    if result.get("compile"):
        head += f"; torch.compile(model, mode={result['compile']!r}) on every side"
        ran = [v for v in result["variants"] if not v["skipped"]]
        notes.append("compile time (first optimizer step less the median one, wall): " + ", ".join(
            f"{v['name']} {v['compile_s']:.1f} s" for v in ran))
        return "\n".join([head, table(headers, rows)] + notes + ["", "memory: not measured with --compile "
                                                                     "(its saved-tensor hooks would change the compiled graphs)"])
    out = [head, table(headers, rows)] + notes + ["", format_memory(result)]
    if breakdown:
        out += ["", format_breakdown(result)]
    return "\n".join(out)


def _per_layer(mem: dict) -> float:
    """Mean bytes autograd saved inside one LoRA layer's forward (nan without LoRA layers)."""
    layers = mem["saved_per_layer_bytes"]
    return sum(layers.values()) / len(layers) if layers else float("nan")


def format_memory(result: dict) -> str:
    """One row per variant: peak, peak above the step's start, saved activations, ratios to peft."""
    ran = [v for v in result["variants"] if not v["skipped"]]
    peft = next(v["memory"] for v in ran if v["name"] == "peft")
    cuda = any("cuda_memory" in v for v in ran)
    headers = ["variant", "peak MiB", "step MiB", "ratio(step)", "peak in", "saved MiB",
               "saved/LoRA layer KiB", "ratio(saved/layer)"]
    headers += ["cuda alloc MiB", "cuda reserved MiB"] if cuda else []
    rows = []
    for v in ran:
        m = v["memory"]
        row = [v["name"], m["peak_bytes"] / 2**20, m["step_bytes"] / 2**20,
               m["step_bytes"] / peft["step_bytes"] if peft["step_bytes"] else None, m["peak_phase"],
               m["saved_bytes"] / 2**20, _per_layer(m) / 2**10, _per_layer(m) / _per_layer(peft)]
        if cuda:
            c = v.get("cuda_memory") or {}
            row += [c.get("allocated_bytes", 0) / 2**20, c.get("reserved_bytes", 0) / 2**20]
        rows.append(row)
    n_layers = len(peft["saved_per_layer_bytes"])
    notes = [f"memory: {result['memory']}; the same whichever variant runs first",
             "peak = live tensor bytes at the step's peak (weights, optimizer state and batch included); "
             "step = peak above the level at the step's start; saved = what autograd keeps from "
             "forward to backward (unique storages, weights excluded); saved/LoRA layer = mean over "
             f"the {n_layers} LoRA layers of what each one's forward saved (its input included)"]
    if cuda:
        notes.append(f"cuda: {result['cuda_memory']}")
    return "\n".join([table(headers, rows)] + notes)


def format_breakdown(result: dict) -> str:
    """What the peak is made of per variant (MiB), and saved bytes per LoRA layer name (KiB)."""
    ran = [v for v in result["variants"] if not v["skipped"]]
    kinds = table(["variant"] + [f"{c} MiB" for c in memory.CATEGORIES],
                  [[v["name"]] + [v["memory"]["breakdown_bytes"][c] / 2**20 for c in memory.CATEGORIES]
                   for v in ran])
    by_name: dict[str, dict[str, list[int]]] = {}  # "q_proj" -> {variant: [bytes per layer]}
    for v in ran:
        for path, n in v["memory"]["saved_per_layer_bytes"].items():
            by_name.setdefault(path.rsplit(".", 1)[-1], {}).setdefault(v["name"], []).append(n)
    names = [v["name"] for v in ran]
    rows = []
    for layer, per in by_name.items():
        means = [sum(per[n]) / len(per[n]) / 2**10 if per.get(n) else None for n in names]
        peft = means[names.index("peft")]
        rows.append([layer, len(per["peft"])] + means + [m / peft if m is not None and peft else None
                                                          for n, m in zip(names, means) if n != "peft"])
    saved = table(["LoRA layer", "count"] + [f"{n} KiB" for n in names]
                  + [f"{n}/peft" for n in names if n != "peft"], rows)
    return ("live at the peak, by kind:\n" + kinds + "\n\nsaved for backward inside each LoRA layer's "
            "forward (mean per layer of that name):\n" + saved)
