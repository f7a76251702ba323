"""train: LoRA fine-tuning with an explicit Accelerate loop (`python -m train`).

    from train import TrainConfig, run
    result = run(TrainConfig(max_steps=200, r=8, output_dir="runs/r8"))
    print(result.before["eval_loss"], result.after["eval_loss"], result.adapter_dir)

With no arguments changed, TrainConfig is the offline demo: a tiny Llama built from
train/assets/tiny_llama.json, a char-level tokenizer, and the bundled quote -> tags dataset.
"""
from .config import BUILTIN_DATASET, BUILTIN_MODEL, TrainConfig, build_parser, parse_args

from .errors import TrainDiverged, TrainError, TrainFailed, TrainInterrupted

__all__ = ["TrainConfig", "TrainResult", "TrainError", "TrainFailed", "TrainDiverged", "TrainInterrupted",
           "run", "preflight", "build_parser", "parse_args", "BUILTIN_MODEL", "BUILTIN_DATASET"]


def __getattr__(name):
    # torch / transformers / accelerate load only when a run needs them, so `--help` is instant.
    if name in ("run", "preflight", "TrainResult"):
        from . import loop
        return getattr(loop, name)
    raise AttributeError(f"module 'train' has no attribute {name!r}")
