"""Peak memory per process while training: FSDP2 over 2 processes against 1 unsharded process (CPU).

    python benchmarks/fsdp_memory.py --save DIR [--quantization nf4]   # once: a Llama from a config
    python benchmarks/fsdp_memory.py DIR [--quantization nf4]          # 1 process, unsharded
    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_memory.py DIR --fsdp [--quantization nf4]

Each process builds what `python -m train` builds (the base through train.models, LoRA r=16 on
every linear layer, AdamW over the LoRA weights, one Accelerate prepare; under --fsdp the same
plugin and CPU switch as `python -m train --fsdp`, nf4 stored as bf16), then trains `--steps`
steps on random tokens, `--rows` x `--seq` per process: the same micro-batch in both runs, so the
activations are the same and what differs is the sharding.

Memory is the kernel's count of resident pages (VmHWM in /proc/self/status, in MiB). Loading
puts the whole base in every process before it is sharded, so the peak is read twice: `load` is
VmHWM after set-up, then VmHWM is reset (writing 5 to /proc/self/clear_refs, after gc and
malloc_trim hand freed pages back) and `train` is VmHWM after the training steps. Both include
the interpreter and libraries (`libs`: VmRSS before the model is built). One JSON line per process.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# hidden 1024, 24 layers, vocab 4096: 316M parameters (1.18 GiB in fp32), 97% of them in the decoder
# layers, as in large models (where the embedding and head are a few % of the weights)
CONFIG = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
              tie_word_embeddings=False)


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--save", action="store_true", help="build the Llama from CONFIG and save it to model_dir")
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--quantization", default="none", choices=("none", "nf4"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rows", type=int, default=1, help="rows per process and step (the same micro-batch "
                    "in both runs, so activations match and the difference is the sharding)")
    args = ap.parse_args()
    import transformers

    if args.save:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(args.model_dir)
        return

    from accelerate import Accelerator

    from lora_core import LoraConfig, get_lora_model, prepare_model_for_kbit_training
    from train import TrainConfig, fsdp
    from train.models import load_base_model

    torch.set_num_threads(1)
    libs = _status_mib("VmRSS")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    storage = "bfloat16" if args.quantization == "nf4" and args.fsdp else "uint8"
    cfg = TrainConfig(model=args.model_dir, quantization=args.quantization, bnb_4bit_quant_storage=storage,
                      fsdp=args.fsdp)
    fsdp.check(cfg)
    plugin = fsdp.build_plugin(cfg)
    accelerator = Accelerator(cpu=world > 1, fsdp_plugin=plugin)
    fsdp.enable_on_cpu(accelerator, plugin)

    base = load_base_model(args.model_dir, args.quantization, 0, "cpu", storage)
    if args.quantization != "none":
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    model = get_lora_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), backend="torch")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    held = sum(p.to_local().untyped_storage().nbytes() if hasattr(p, "to_local") else p.untyped_storage().nbytes()
               for p in model.parameters()) / 2**20

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    load_peak, setup_rss = _status_mib("VmHWM"), _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    g = torch.Generator().manual_seed(accelerator.process_index)
    for _ in range(args.steps):
        ids = torch.randint(0, CONFIG["vocab_size"], (args.rows, args.seq), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    train_peak = _status_mib("VmHWM")
    # Live tensor bytes of one more step, from the allocator's events (compare.memory): the same
    # count whatever the C allocator keeps, FSDP's gathered weights and their buffers included.
    from compare.memory import measure_step

    ids = torch.randint(0, CONFIG["vocab_size"], (args.rows, args.seq), generator=g)
    step = measure_step(model, optimizer, {"input_ids": ids, "labels": ids}, {})
    print(json.dumps({"rank": accelerator.process_index, "world": world, "fsdp": fsdp.is_sharded(accelerator),
                      "quantization": args.quantization, "storage": storage, "params_held_mib": round(held, 1),
                      "libs_mib": round(libs), "load_peak_mib": round(load_peak), "setup_rss_mib": round(setup_rss),
                      "train_peak_mib": round(train_peak), "step_start_mib": round(step.start_bytes / 2**20, 1),
                      "step_peak_mib": round(step.peak_bytes / 2**20, 1), "peak_phase": step.peak_phase,
                      "at_peak_mib": {k: round(v / 2**20, 1) for k, v in step.breakdown.items()}}), flush=True)
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
