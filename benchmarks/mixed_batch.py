"""What a mixed batch costs: one forward whose rows use different adapters, against one adapter.

    python benchmarks/mixed_batch.py [--hidden 1024] [--layers 2] [--batch 8] [--seq 64] [--reps 20]

A Llama built from a config (nothing downloaded), two adapters "a" and "b" (r=16, all-linear,
B != 0), eval mode under no_grad, fp32 on CPU (bf16 on CUDA), the same input every time. Variants,
timed interleaved in one process (median of `reps`; CPU time on CPU, CUDA events on a GPU):

    one adapter        "a" active, no adapter_names: one fused kernels.lora_linear call per layer
    mixed a/b/base     adapter_names cycling "a", "b", "__base__" over the rows: the base once for
                       all rows, then each adapter's term on its own rows (gather, term, write back)
    mixed all a        adapter_names = ["a"] * batch: the grouped path with a single group
    peft one / peft mixed a/b/base    the same two on peft 0.21

Prints ms per forward and the ratio to "one adapter" (and peft's to its own one-adapter run).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(hidden: int, layers: int, lib: str):
    import peft
    import transformers

    import lora_core

    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    cfg = dict(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    if lib == "ours":
        model = lora_core.get_lora_model(base, lora_core.LoraConfig(**cfg), adapter_name="a", backend="auto")
        model.add_adapter("b", lora_core.LoraConfig(**cfg))
    else:
        model = peft.get_peft_model(base, peft.LoraConfig(**cfg), adapter_name="a")
        model.add_adapter("b", peft.LoraConfig(**cfg))
    return model.eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    ours, theirs = (build(args.hidden, args.layers, lib).to(device, dtype) for lib in ("ours", "peft"))
    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(device)
    mixed = [("a", "b", "__base__")[i % 3] for i in range(args.batch)]
    variants = {
        "one adapter": lambda: ours(input_ids=ids),
        "mixed a/b/base": lambda: ours(input_ids=ids, adapter_names=mixed),
        "mixed all a": lambda: ours(input_ids=ids, adapter_names=["a"] * args.batch),
        "peft one": lambda: theirs(input_ids=ids),
        "peft mixed a/b/base": lambda: theirs(input_ids=ids, adapter_names=mixed),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for f in variants.values():  # warm-up (and a check that every variant runs)
            f()
        for _ in range(args.reps):
            for name, f in variants.items():
                times[name].append(_timed(f, cuda))
    med = {k: statistics.median(v) for k, v in times.items()}
    clock = "CUDA events" if cuda else "process CPU time"
    print(f"mixed batch: Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch} x seq {args.seq}, "
          f"2 adapters r=16 all-linear, {dtype}, {device}, {args.threads} thread(s); median of {args.reps} ({clock})")
    for name, t in med.items():
        ref = med["peft one"] if name.startswith("peft") else med["one adapter"]
        print(f"  {name:<22} {t * 1e3:8.2f} ms   x{t / ref:.3f}")


def _timed(f, cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        f()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.process_time()
    f()
    return time.process_time() - t


if __name__ == "__main__":
    main()
