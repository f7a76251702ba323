"""TrainConfig: every knob of a run, and the argparse CLI generated from it.

The dataclass below is the ONE list of options: each field's default and `help` metadata make the
`--flag` (underscores become dashes, as in HF `TrainingArguments`), so the CLI, `--help` and the
Python API can never disagree. Booleans become `--flag / --no-flag`.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

BUILTIN_MODEL = "builtin:tiny-llama"  # the tiny Llama built from train/assets/tiny_llama.json
BUILTIN_DATASET = "builtin:tagger"  # train/assets/tagger.jsonl (scripts/make_tagger_data.py)


def _f(default: Any, help: str, choices: tuple | None = None):
    """A dataclass field carrying its CLI help text (and choices) as metadata."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """One training run. Defaults are the embedded offline demo (`python -m train` with no flags)."""

    # --- model -------------------------------------------------------------------------------
    model: str = _f(BUILTIN_MODEL, "hub id or local directory of a causal LM (seq2seq when the config "
                    "is encoder-decoder); the default is a tiny Llama built from a config in the package")
    quantization: str = _f("none", "load the base through bitsandbytes: nf4 (double quant, bf16 "
                           "compute), fp4, int8 or none", ("none", "nf4", "fp4", "int8"))
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    bnb_4bit_quant_storage: str = _f("uint8", "dtype the packed 4-bit weights are stored in (transformers' "
                                     "name); --fsdp shards them only when it is a float dtype: use "
                                     "bfloat16, the compute dtype", ("uint8", "bfloat16", "float16", "float32"))
    fsdp: bool = _f(False, "shard the frozen base and the LoRA weights over the processes with FSDP2 "
                    "(through Accelerate); launch >= 2 processes with torchrun or accelerate launch")
    # --- LoRA --------------------------------------------------------------------------------
    r: int = _f(16, "LoRA rank")
    lora_alpha: float = _f(32.0, "LoRA alpha; scaling = lora_alpha / r")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch input")
    target_modules: str = _f("all-linear", "comma-separated module names to adapt, or all-linear")
    kernel: str = _f("auto", "LoRA forward/backward backend", ("auto", "torch", "triton"))
    # --- data --------------------------------------------------------------------------------
    dataset: str = _f(BUILTIN_DATASET, "hub dataset name (online) or a local .json/.jsonl/.csv/"
                      ".parquet/.txt file or directory; the default is the bundled quote tagger set")
    text_template: str = _f("{quote} ->: {tags}", "str.format template building each text from columns")
    completion_separator: str = _f(" ->: ", "text in the template that ends the prompt; the completion "
                                   "follows it (used by --completion-only-loss and the tag score)")
    completion_only_loss: bool = _f(True, "train only on the completion after --completion-separator "
                                    "(labels -100 on the prompt)")
    max_length: int = _f(128, "truncate each tokenized text to this many tokens")
    packing: bool = _f(False, "concatenate texts and cut them into --max-length blocks")
    eval_split_size: float = _f(0.1, "fraction held out for eval when the dataset has no eval split")
    # --- optimisation ------------------------------------------------------------------------
    max_steps: int = _f(500, "optimizer steps to run; <= 0 means use --num-train-epochs")
    num_train_epochs: float = _f(3.0, "epochs to run when --max-steps <= 0")
    per_device_train_batch_size: int = _f(16, "micro-batch size per process")
    per_device_eval_batch_size: int = _f(32, "eval batch size per process")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    learning_rate: float = _f(3e-3, "peak learning rate of AdamW")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(50, "linear warm-up steps")
    lr_scheduler_type: str = _f("linear", "schedule after warm-up (transformers.get_scheduler)",
                                ("linear", "cosine", "constant", "constant_with_warmup"))
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (<= 0: no clipping)")
    mixed_precision: str = _f("no", "autocast dtype for the forward", ("no", "fp16", "bf16"))
    cpu_threads: int = _f(0, "torch CPU threads per process; 0 = auto (1 for the built-in tiny model, "
                          "whose ops are too small to split; torch's default otherwise)")
    seed: int = _f(42, "seed for the model init, LoRA init, data order and dropout")
    # --- logging, eval, checkpoints, outputs -------------------------------------------------
    output_dir: str = _f("runs/lorafuse", "where log.jsonl, loss.png, checkpoints and the adapter go")
    logging_steps: int = _f(25, "log the train loss every N optimizer steps")
    eval_steps: int = _f(100, "evaluate every N optimizer steps (<= 0: only before and after)")
    save_steps: int = _f(100, "checkpoint every N optimizer steps (<= 0: no checkpoints)")
    save_total_limit: int = _f(2, "keep only the last N checkpoints (<= 0: keep all)")
    resume_from_checkpoint: str = _f("", "latest or a checkpoint directory to continue a run from")
    tag_eval_samples: int = _f(64, "eval prompts for the exact-match completion (tag) score; 0 = skip")
    num_sample_generations: int = _f(3, "eval prompts whose generations are printed at the end")
    max_new_tokens: int = _f(32, "generation length for the tag score and the samples")
    merge: bool = _f(False, "also write a merged full model + tokenizer to <output-dir>/merged")
    report_to: str = _f("auto", "tensorboard, none, or auto (tensorboard when installed)",
                        ("auto", "tensorboard", "none"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Append every flag's default to its help; strings quoted so ' ->: ' shows its spaces."""

    def _get_help_string(self, action):
        if action.default is argparse.SUPPRESS or action.dest == "help":
            return action.help
        fmt = "%(default)r" if isinstance(action.default, str) else "%(default)s"
        return f"{action.help} (default: {fmt})"


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one `--flag` per TrainConfig field, defaults shown in --help."""
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="LoRA fine-tuning with an explicit Accelerate loop. With no flags: the offline "
                    "demo (tiny Llama, bundled quote->tags data, before/after eval).",
        formatter_class=_DefaultsFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=f.default, help=meta["help"])
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str)
                                                            else f.type.__name__]
            p.add_argument(flag, dest=f.name, type=typ, default=f.default, help=meta["help"],
                           choices=meta["choices"])
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse CLI arguments into a TrainConfig."""
    ns = build_parser().parse_args(argv)
    return TrainConfig(**vars(ns))
