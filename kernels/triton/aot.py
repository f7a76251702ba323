"""Compile what a call would launch, for a GPU target, without a GPU (static checks; no launch).

    launches = capture(lambda: launch.forward(call, seed))   # call built on meta tensors
    text = ttir(launches[0], config)                         # the TTIR after Triton's TTIR passes
    compiled = compile(launches[0], config)                  # cubin + metadata (shared memory ...)
    resources(compiled), sass_loops(compiled)                # registers / spills, SASS loop sizes

Meta tensors have shapes, strides, dtypes and 16-byte-aligned data pointers but no storage, so the
real launchers run on them unchanged up to the launch, which `capture` intercepts. `specialise`
then derives the signature exactly as the JIT does for those arguments (`native_specialize_impl`:
pointers 16-byte aligned and ints divisible by 16 get the divisibility attribute, ints equal to 1
become constexprs, e.g. a unit stride), so the compiled kernel is the one the GPU would run, not
a generic one with other registers and shared memory. `resources` and `sass_loops` read the cubin
with the cuobjdump / nvdisasm bundled with Triton. Used by benchmarks/aot_compile.py and the
int64-offset tests. Needs TRITON_INTERPRET unset (the interpreter has no compiler).
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, KernelInterface, native_specialize_impl

SM90 = GPUTarget("cuda", 90, 32)
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass
class Launch:
    """One intercepted `kernel[grid](*args, **kwargs)`."""

    kernel: KernelInterface  # a JITFunction, or the Autotuner around one
    args: tuple
    kwargs: dict

    @property
    def fn(self) -> JITFunction:
        return self.kernel.fn if isinstance(self.kernel, Autotuner) else self.kernel

    @property
    def name(self) -> str:
        return self.fn.__name__

    def configs(self) -> list:
        """Every config autotuning may try (the pruner's input); one implied config for a plain jit."""
        if isinstance(self.kernel, Autotuner):
            return list(self.kernel.configs)
        opts = {k: v for k, v in self.kwargs.items() if k in _OPTIONS}
        return [triton.Config({}, **opts)]

    def kept(self) -> list:
        """The configs the autotuner's pruner keeps for this launch (all of them for a plain jit)."""
        if not isinstance(self.kernel, Autotuner) or self.kernel.early_config_prune is None:
            return self.configs()
        named = dict(zip(self.kernel.arg_names, self.args))
        return self.kernel.early_config_prune(self.kernel.configs, named, **self.kwargs)


def capture(fn: Callable[[], object]) -> list[Launch]:
    """Run fn with every Triton launch intercepted (nothing runs); returns the launches in order."""
    launches: list[Launch] = []
    original = KernelInterface.__getitem__

    def intercept(self, grid):
        return lambda *args, **kwargs: launches.append(Launch(self, args, kwargs))

    KernelInterface.__getitem__ = intercept
    try:
        fn()
    finally:
        KernelInterface.__getitem__ = original
    return launches


def specialise(launch: Launch, config: triton.Config, target: GPUTarget = SM90) -> tuple[ASTSource, dict]:
    """(ASTSource, compile options) of `launch` at `config`, specialised as the JIT would."""
    from triton.compiler.compiler import make_backend

    backend = type(make_backend(target))
    fn = launch.fn
    values = dict(zip(fn.arg_names, launch.args))
    values.update({k: v for k, v in launch.kwargs.items() if k not in _OPTIONS})
    values.update(config.kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
            continue
        kind, spec = native_specialize_impl(backend, v, p.is_const, not p.do_not_specialize,
                                            not p.do_not_specialize_on_alignment)
        signature[p.name] = kind
        if kind == "constexpr":  # an int equal to 1 (or None): folded into the kernel, as the JIT does
            constexprs[p.name] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = backend.parse_attr(spec)
    options = {k: getattr(config, k) for k in ("num_warps", "num_stages") if getattr(config, k, None) is not None}
    return ASTSource(fn, signature, constexprs, attrs), options


def compile(launch: Launch, config: triton.Config, target: GPUTarget = SM90):
    """The compiled kernel (triton's CompiledKernel: .asm["cubin"], .metadata.shared, ...)."""
    src, options = specialise(launch, config, target)
    return triton.compile(src, target=target, options=options)


def ttir(launch: Launch, config: Optional[triton.Config] = None, target: GPUTarget = SM90) -> str:
    """The kernel's TTIR after Triton's TTIR passes (calls inlined, canonicalised), as text."""
    from triton._C.libtriton import ir
    from triton.compiler.compiler import make_backend

    config = config or launch.configs()[0]
    src, options = specialise(launch, config, target)
    backend = make_backend(target)
    opts = backend.parse_options(options)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context)
    stages: dict = {}
    backend.add_stages(stages, opts, src.language)
    return str(stages["ttir"](module, {}))


def _tool(name: str) -> str:
    """cuobjdump / nvdisasm as bundled with Triton (no CUDA toolkit needed)."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _run_on_cubin(compiled, tool: str, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([_tool(tool), *flags, f.name], capture_output=True, text=True).stdout


def resources(compiled) -> dict:
    """{"REG": registers/thread, "STACK": spill bytes/thread, "LOCAL": ...} from cuobjdump (Triton's
    spills show under STACK, not LOCAL)."""
    text = _run_on_cubin(compiled, "cuobjdump", "--dump-resource-usage")
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}


def sass_loops(compiled) -> list[tuple[int, collections.Counter]]:
    """Each loop of the kernel's SASS as (instruction count, opcode counts), biggest first. A loop is a
    backward branch (BRA to an earlier label) in `nvdisasm -c` output; its body is the lines between."""
    lines = _run_on_cubin(compiled, "nvdisasm", "-c").splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(r"\.(L_x_\d+):", line.strip())
        if m:
            labels[m.group(1)] = i
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?\.?(L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i:
            ops = collections.Counter(_opcodes(lines[labels[m.group(1)]:i + 1]))
            if set(ops) != {"BRA"}:  # not the kernel's closing `BRA` to itself
                loops.append((sum(ops.values()), ops))
    return sorted(loops, key=lambda t: -t[0])


def sass_count(compiled) -> int:
    """Instructions of the whole kernel (for kernels without a loop)."""
    return sum(1 for _ in _opcodes(_run_on_cubin(compiled, "nvdisasm", "-c").splitlines()))


def _opcodes(lines):
    for body in lines:
        op = re.search(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", body)
        if op:
            yield op.group(2)
