"""python -m compare equivalence | speed | sweep  (run with --help for each command's flags)."""
from __future__ import annotations

import argparse
import os
import sys


def _prepare_triton_interpreter(argv: list[str]) -> None:
    """Turn on Triton's interpreter before anything imports triton, when triton is asked for on a
    machine without CUDA: the interpreter reads TRITON_INTERPRET once, at triton's import."""
    wants_triton = any(a == "--kernel=triton" for a in argv) or any(
        a == "--kernel" and i + 1 < len(argv) and argv[i + 1] == "triton" for i, a in enumerate(argv))
    if not wants_triton or "triton" in sys.modules or os.environ.get("TRITON_INTERPRET"):
        return
    import torch  # importing torch does not import triton

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def _model_flags(p: argparse.ArgumentParser, kernel: bool = True) -> None:
    from .models import DTYPES, KERNELS, QUANTIZATIONS

    p.add_argument("--model", default="tiny",
                   help="'tiny' (the embedded default), a local model directory or a hub id (default: tiny)")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="base weights through bitsandbytes: nf4 = double quant (default: none)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="base compute dtype; LoRA weights stay fp32 on both sides (default: float32, "
                        "bfloat16 with --kernel triton, whose kernels take fp16/bf16 activations)")
    if kernel:
        p.add_argument("--kernel", default="torch", choices=KERNELS,
                       help="our backend (triton on CPU runs in Triton's interpreter) (default: torch)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default: 8)")
    p.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (default: 16)")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated module name suffixes, or 'all-linear' "
                        "(default: the per-architecture default, same rule as peft)")
    p.add_argument("--batch", type=int, default=2, help="sequences per batch (default: 2)")
    p.add_argument("--seq", type=int, default=16, help="tokens per sequence (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA weights (default: 0)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")


def _spec(args):
    from .models import ModelSpec

    tm = args.target_modules
    if tm is not None and tm != "all-linear":
        tm = [t.strip() for t in tm.split(",") if t.strip()]
    kernel = getattr(args, "kernel", "torch")
    dtype = args.dtype or ("bfloat16" if kernel == "triton" else "float32")
    return ModelSpec(model=args.model, quantization=args.quantization, dtype=dtype,
                     r=args.r, lora_alpha=args.lora_alpha, target_modules=tm,
                     kernel=kernel, batch=args.batch, seq=args.seq,
                     seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compare",
                                     description="Equivalence and speed of lorafuse against peft; ablation sweeps.")
    sub = parser.add_subparsers(dest="command", required=True)
    from .analyze import add_analyze_parser
    add_analyze_parser(sub)

    eq = sub.add_parser("equivalence", help="row-by-row numerical comparison with peft; exit 1 on any FAIL")
    _model_flags(eq)
    eq.add_argument("--steps", type=int, default=4, help="AdamW steps in the trajectory check (default: 4)")

    sp = sub.add_parser("speed", help="forward / forward+backward / optimizer-step time and memory vs peft")
    _model_flags(sp, kernel=False)
    sp.add_argument("--steps", type=int, default=20, help="timed repetitions per variant (default: 20)")
    sp.add_argument("--warmup", type=int, default=3, help="untimed warm-up repetitions (default: 3)")
    sp.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice)")
    sp.add_argument("--lora-dropout", type=float, default=0.0,
                    help="dropout on the LoRA branch, both sides (default: 0; the recipes use 0.05)")
    sp.add_argument("--memory-breakdown", action="store_true",
                    help="also print what the memory peak is made of (weights, optimizer state, "
                         "gradients, saved activations, other) and the bytes saved per LoRA layer name")
    sp.add_argument("--plot", default=None, metavar="PATH",
                    help="also write a PNG here: time per phase with p10-p90, ratio to peft, memory")

    sw = sub.add_parser("sweep", help="short trainings over a grid of TrainConfig fields")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a TrainConfig field and its values; repeat for more axes")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a TrainConfig field fixed for every run; repeatable")
    sw.add_argument("--max-steps", type=int, default=None, help="training steps per run (default: 20)")
    sw.add_argument("--out", default="sweep_out", help="directory for results.csv/json and plot (default: sweep_out)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _prepare_triton_interpreter(argv)
    args = build_parser().parse_args(argv)

    from .models import CompareError
    from .report import write_json

    def say(msg: str) -> None:
        print(f"[compare] {msg}", file=sys.stderr, flush=True)

    if args.command in ("equivalence", "speed"):
        import transformers

        # The tables are the output; transformers' per-load progress bars would bury them.
        transformers.utils.logging.disable_progress_bar()
    try:
        if args.command == "analyze":
            from .analyze import run_analyze_command
            return run_analyze_command(args, progress=say)
        if args.command == "equivalence":
            from .equivalence import run_equivalence

            if args.steps < 1:
                raise CompareError(f"--steps must be >= 1, got {args.steps}")
            report = run_equivalence(_spec(args), steps=args.steps, progress=say)
            print(report.format())
            if args.json:
                write_json(args.json, report.to_dict())
            return 0 if report.ok else 1
        if args.command == "speed":
            from .speed import format_speed, run_speed

            if args.steps < 1 or args.warmup < 0:
                raise CompareError(f"need --steps >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
            if args.threads is not None:
                if args.threads < 1:
                    raise CompareError(f"--threads must be >= 1, got {args.threads}")
                import torch

                torch.set_num_threads(args.threads)
            if not 0.0 <= args.lora_dropout < 1.0:
                raise CompareError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
            if args.plot is not None:
                from .plots import check_png_path

                check_png_path(args.plot)
            result = run_speed(_spec(args), steps=args.steps, warmup=args.warmup, progress=say,
                               lora_dropout=args.lora_dropout)
            print(format_speed(result, breakdown=args.memory_breakdown))
            if args.json:
                write_json(args.json, result)
            if args.plot is not None:
                from .plots import plot_speed

                print(f"wrote {plot_speed(result, args.plot)}")
            return 0
        if args.command == "sweep":
            from .ablation import format_rows, parse_grid, parse_settings, sweep

            if not args.grid:
                raise CompareError("give at least one --grid KEY=V1,V2 (a TrainConfig field and its values)")
            grid = parse_grid(args.grid)
            base = parse_settings(args.set)
            rows = sweep(base, grid, out_dir=args.out, max_steps=args.max_steps, progress=say)
            print(format_rows(rows))
            print(f"wrote {args.out}/results.csv, results.json, results.png")
            return 0
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
