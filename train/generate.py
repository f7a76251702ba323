"""`python -m train.generate`: load an adapter (a folder or a hub id) on its base and complete a prompt.

    python -m train.generate --adapter runs/lorafuse/adapter --model builtin:tiny-llama \
        --prompt "The river keeps the clock. ->: "
    python -m train.generate --adapter tloen/alpaca-lora-7b --prompt "Tell me about alpacas." \
        --quantization nf4 --max-new-tokens 64
    python -m train.generate ... --no-adapter        # the base model alone, for comparison

The base is --model, else the adapter's `base_model_name_or_path`; the built-in tiny Llama is
rebuilt from --seed (a run's --seed, 42 by default). The tokenizer is the one saved beside the
adapter (`python -m train` saves it there), else the base's. Greedy decoding; the completion (the
new tokens only) goes to stdout, nothing else does. Bad input is one `error:` line and exit 2,
before any model is loaded.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import BUILTIN_MODEL, ArgumentParser
from .errors import TrainError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m train.generate",
                                description="Complete a prompt with a LoRA adapter (PEFT format) on its base model.")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + weights) or hub id")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--model", default=None, help="base model: hub id, local folder or builtin:tiny-llama "
                   "(default: the base the adapter names)")
    p.add_argument("--quantization", default="none", choices=("none", "nf4", "fp4", "int8"),
                   help="load the base through bitsandbytes (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate; > 0 (default: 64)")
    p.add_argument("--seed", type=int, default=42, help="seed the built-in tiny Llama is rebuilt from "
                   "(the training run's --seed; default: 42)")
    p.add_argument("--backend", "--kernel", dest="backend", default="auto", choices=("auto", "torch", "triton"),
                   help="LoRA backend (default: auto; --kernel is its old, deprecated name)")
    p.add_argument("--no-adapter", action="store_true", help="generate with the base model alone")
    return p


def check(args) -> tuple[object, str]:
    """(the adapter's config, the base model name); TrainError on bad input. Loads no model."""
    from lora_core.io import read_config

    if not args.prompt.strip():
        raise TrainError("--prompt is empty; pass the text to continue")
    if args.max_new_tokens <= 0:
        raise TrainError(f"--max-new-tokens must be > 0 (got {args.max_new_tokens})")
    try:
        config = read_config(args.adapter)
    except (OSError, ValueError) as e:
        raise TrainError(f"--adapter {args.adapter}: {str(e).splitlines()[0]}") from None
    if config.task_type not in (None, "CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise TrainError(f"--adapter {args.adapter} is a {config.task_type} adapter; generation needs a "
                         f"language-model adapter (CAUSAL_LM or SEQ_2_SEQ_LM)")
    base = args.model or config.base_model_name_or_path
    if not base:
        raise TrainError(f"--adapter {args.adapter} does not name its base model; pass --model (for a run on "
                         f"the built-in model: --model {BUILTIN_MODEL} --seed <the run's seed>)")
    if base != BUILTIN_MODEL:
        from .models import model_config
        model_config(base)  # TrainError naming the problem when the base cannot be found
    return config, base


def generate(args, base_name: str) -> str:
    """The completion of args.prompt (new tokens only, special tokens dropped)."""
    import torch

    from lora_core import LoraModel

    from .models import is_seq2seq, load_base_model, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_base_model(base_name, args.quantization, args.seed, device)
    if args.quantization == "none":
        model.to(device)  # bitsandbytes places quantized weights itself
    if not args.no_adapter:
        try:
            model = LoraModel.from_pretrained(model, args.adapter)
        except ValueError as e:  # e.g. an adapter trained on another base: the first line says which
            raise TrainError(f"--adapter {args.adapter}: {str(e).splitlines()[0]} (pass the base it was "
                             f"trained on with --model)") from None
        model.set_backend(args.backend)
    model.eval()
    tokenizer = _tokenizer(args.adapter) or load_tokenizer(base_name)
    enc = tokenizer(args.prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = out[0] if is_seq2seq(base_name) else out[0, enc["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True)


def _tokenizer(adapter: str):
    """The tokenizer saved beside a local adapter, or None."""
    path = Path(adapter).expanduser()
    if not (path / "tokenizer_config.json").is_file():
        return None
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .quiet import quiet_start

    quiet_start()  # before anything imports bitsandbytes
    args = build_parser().parse_args(argv)  # argparse exits 2 itself on a missing flag / bad choice
    try:
        _, base = check(args)
        import transformers
        transformers.utils.logging.disable_progress_bar()  # stdout/stderr carry the completion only
        print(generate(args, base))
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
