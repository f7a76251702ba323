"""python -m compare equivalence | speed | sweep | analyze  (run with --help for each command's flags)."""
from __future__ import annotations

import argparse
import os
import sys


def _prepare_triton_interpreter(argv: list[str]) -> None:
    """Turn on Triton's interpreter before anything imports triton, when triton is asked for on a
    machine without CUDA: the interpreter reads TRITON_INTERPRET once, at triton's import."""
    flags = ("--backend", "--kernel")  # --kernel: the old name
    wants_triton = any(a in (f + "=triton" for f in flags) for a in argv) or any(
        a in flags and i + 1 < len(argv) and argv[i + 1] == "triton" for i, a in enumerate(argv))
    if not wants_triton or "triton" in sys.modules or os.environ.get("TRITON_INTERPRET"):
        return
    import torch  # importing torch does not import triton

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def _num(p: argparse.ArgumentParser, flag: str, typ, default, help: str, **bounds) -> None:
    """A numeric flag whose valid range (train.config.Bounds: gt/ge/lt/le; floats also finite) is
    declared here once: --help shows it and `check_numbers` enforces it before any work."""
    from train.config import Bounds

    b = Bounds(**bounds)
    shown = "" if default is None else f"; default: {default}"
    act = p.add_argument(flag, type=typ, default=default, help=f"{help} (must be {b.rule(typ is float)}{shown})")
    act.bounds = b


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """CompareError for the first numeric flag of the chosen command outside its declared range."""
    from .models import CompareError

    sub = parser.commands[args.command]
    for act in sub._actions:
        b = getattr(act, "bounds", None)
        value = getattr(args, act.dest, None)
        if b is not None and value is not None and not b.accepts(value):
            raise CompareError(f"{act.option_strings[0]} must be {b.rule(act.type is float)} (got {value})")


def _model_flags(p: argparse.ArgumentParser, backend: bool = True) -> None:
    from .models import DTYPES, BACKENDS, QUANTIZATIONS

    p.add_argument("--model", default="tiny",
                   help="'tiny' (the embedded default), a local model directory or a hub id (default: tiny)")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="base weights through bitsandbytes: nf4 = double quant (default: none)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="base compute dtype; LoRA weights stay fp32 on both sides (default: float32, "
                        "bfloat16 with --backend triton, whose kernels take fp16/bf16 activations)")
    if backend:
        p.add_argument("--backend", "--kernel", dest="backend", default="torch", choices=BACKENDS,
                       help="our backend (triton on CPU runs in Triton's interpreter; --kernel is its old, "
                            "deprecated name) (default: torch)")
    _num(p, "--r", int, 8, "LoRA rank", gt=0)
    _num(p, "--lora-alpha", int, 16, "LoRA alpha", gt=0)
    p.add_argument("--target-modules", default=None,
                   help="comma-separated module name suffixes, or 'all-linear' "
                        "(default: the per-architecture default, same rule as peft)")
    p.add_argument("--use-dora", action="store_true", help="DoRA on both sides (peft's use_dora)")
    p.add_argument("--use-rslora", action="store_true", help="rsLoRA scaling lora_alpha / sqrt(r), both sides")
    p.add_argument("--lora-bias", action="store_true", help="a bias on lora_B, both sides (peft's lora_bias)")
    p.add_argument("--init-lora-weights", default="true", metavar="INIT",
                   help="peft's init_lora_weights on both sides: true, false, gaussian, orthogonal, pissa, "
                        "pissa_niter_<N>, olora (loftq: CUDA only, as peft's) (default: true)")
    _num(p, "--batch", int, 2, "sequences per batch", gt=0)
    _num(p, "--seq", int, 16, "tokens per sequence", ge=2)
    _num(p, "--seed", int, 0, "seed of the LoRA weights", ge=0, le=2**32 - 1)
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results as JSON here (checked writable before any work)")


def _spec(args):
    from .models import ModelSpec

    tm = args.target_modules
    if tm is not None and tm != "all-linear":
        tm = [t.strip() for t in tm.split(",") if t.strip()]
    backend = getattr(args, "backend", "torch")
    dtype = args.dtype or ("bfloat16" if backend == "triton" else "float32")
    return ModelSpec(model=args.model, quantization=args.quantization, dtype=dtype,
                     r=args.r, lora_alpha=args.lora_alpha, target_modules=tm,
                     backend=backend, batch=args.batch, seq=args.seq,
                     seed=args.seed, use_dora=args.use_dora, use_rslora=args.use_rslora,
                     lora_bias=args.lora_bias, init_lora_weights=args.init_lora_weights)


def build_parser() -> argparse.ArgumentParser:
    from train.config import ArgumentParser

    parser = ArgumentParser(prog="python -m compare",
                                     description="Equivalence and speed of lorafuse against peft; ablation "
                                                 "sweeps. Exit codes: 0 ok, 1 a check failed (equivalence) or "
                                                 "a run failed (sweep), 2 bad input (before any work), 130 "
                                                 "interrupted.")
    sub = parser.add_subparsers(dest="command", required=True)
    from .analyze import SUBSPACES, add_analyze_parser
    an = add_analyze_parser(sub)

    eq = sub.add_parser("equivalence", help="row-by-row numerical comparison with peft; exit 1 on any FAIL")
    _model_flags(eq)
    _num(eq, "--steps", int, 4, "AdamW steps in the trajectory check", ge=1)
    eq.add_argument("--method", default="lora", choices=("lora", "ia3", "adalora", "adaption-prompt", "prompt-tuning"),
                    help="PEFT method on both sides; --r is AdaLoRA's init_r and the prompt length of "
                         "adaption-prompt / prompt-tuning (default: lora)")

    from .speed import COMPILE_MODES

    sp = sub.add_parser("speed", help="forward / forward+backward / optimizer-step time and memory vs peft")
    _model_flags(sp, backend=False)
    _num(sp, "--steps", int, 20, "timed repetitions per variant", ge=1)
    _num(sp, "--warmup", int, 3, "untimed warm-up repetitions", ge=0)
    _num(sp, "--threads", int, None, "torch intra-op threads; torch's choice when not given", ge=1)
    _num(sp, "--lora-dropout", float, 0.0, "dropout on the LoRA branch, both sides (the recipes use 0.05)",
         ge=0, lt=1)
    sp.add_argument("--memory-breakdown", action="store_true",
                    help="also print what the memory peak is made of (weights, optimizer state, "
                         "gradients, saved activations, other) and the bytes saved per LoRA layer name")
    sp.add_argument("--plot", default=None, metavar="PATH",
                    help="also write a PNG here: time per phase with p10-p90, ratio to peft, memory")
    sp.add_argument("--compile", action="store_true",
                    help="time torch.compile(model) on every side (compiled ours vs compiled peft) and "
                         "report each side's compile time; memory is then not measured")
    sp.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                    help="torch.compile's mode with --compile (default: default)")

    sw = sub.add_parser("sweep", help="short trainings over a grid of TrainConfig fields; exit 1 if a run failed")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a TrainConfig field and its values; repeat for more axes")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a TrainConfig field fixed for every run; repeatable (e.g. overwrite_output_dir=true "
                         "to replace a run folder that holds another setting's run)")
    _num(sw, "--max-steps", int, None, "training steps per run; 20 when not given", ge=1)
    sw.add_argument("--out", default="sweep_out",
                    help="directory for results.csv/json, summary.csv/json, the plot and runs/; earlier results "
                         "there are merged, not replaced, and runs an earlier sweep finished there with the "
                         "same full setting are reused (default: sweep_out)")
    _num(sw, "--seeds", int, None, "runs per setting, with seeds s, s+1, ..., s+N-1 (s: the base config's "
         "seed, --set seed=S, TrainConfig's 42 by default); summary.* aggregates them", ge=1)
    sw.add_argument("--force", action="store_true",
                    help="rerun runs that an earlier sweep into --out finished (else they are reused)")
    _num(sw, "--jobs", int, 1, "worker processes running settings side by side, each with cpus // N torch "
         "threads", ge=1)
    sw.add_argument("--analyze-against", default=None, metavar="KEY=V[,KEY=V] | FOLDER",
                    help="run `compare analyze` on every finished run against a reference: the same setting "
                         "with these grid values (seed=42: the seed-42 run of each setting), or one adapter "
                         "folder; adds effective_rank, phi_11, phi_diag columns")
    sw.add_argument("--analyze-subspace", default="A", choices=list(SUBSPACES),
                    help="what phi compares, as `compare analyze --subspace` (default: A)")
    parser.commands = {"equivalence": eq, "speed": sp, "sweep": sw, "analyze": an}
    return parser


def transformers_quiet() -> None:
    """transformers' per-load progress bars would bury the tables."""
    import transformers

    transformers.utils.logging.disable_progress_bar()


def _print_summary(out: str) -> None:
    """The summary table of a sweep (summary.json in `out`) when some setting has more than one run."""
    import json
    from pathlib import Path

    from .sweep_stats import format_summary

    data = json.loads((Path(out) / "summary.json").read_text())
    if any(g["runs"] > 1 for g in data["groups"]):
        print("\nper setting, over its seeds:")
        print(format_summary(data["groups"], data["group_keys"]))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from train.quiet import quiet_start

    quiet_start()  # before anything imports bitsandbytes
    _prepare_triton_interpreter(argv)
    from train.config import note_old_flags

    note_old_flags(argv)
    parser = build_parser()
    args = parser.parse_args(argv)

    from .models import CompareError
    from .report import check_writable_file, write_json

    def say(msg: str) -> None:
        print(f"[compare] {msg}", file=sys.stderr, flush=True)

    if args.command in ("equivalence", "speed"):
        transformers_quiet()
    try:
        check_numbers(parser, args)
        if getattr(args, "json", None):
            check_writable_file(args.json, "--json")
        if args.command == "analyze":
            from .analyze import run_analyze_command
            return run_analyze_command(args, progress=say)
        if args.command == "equivalence":
            from .equivalence import run_equivalence

            if args.method != "lora":
                from .methods import run_method_equivalence
                report = run_method_equivalence(_spec(args), args.method, steps=args.steps, progress=say)
            else:
                report = run_equivalence(_spec(args), steps=args.steps, progress=say)
            print(report.format())
            if args.json:
                write_json(args.json, report.to_dict())
            return 0 if report.ok else 1
        if args.command == "speed":
            from .speed import format_speed, run_speed

            if args.threads is not None:
                import torch

                torch.set_num_threads(args.threads)
            if args.compile and (args.plot is not None or args.memory_breakdown):
                raise CompareError("--plot and --memory-breakdown show memory, which --compile does not measure; "
                                   "run them without --compile")
            if args.compile_mode != "default" and not args.compile:
                raise CompareError(f"--compile-mode {args.compile_mode} needs --compile")
            if args.plot is not None:
                from .plots import check_png_path

                check_png_path(args.plot)
            result = run_speed(_spec(args), steps=args.steps, warmup=args.warmup, progress=say,
                               lora_dropout=args.lora_dropout, compile=args.compile,
                               compile_mode=args.compile_mode)
            print(format_speed(result, breakdown=args.memory_breakdown))
            if args.json:
                write_json(args.json, result)
            if args.plot is not None:
                from .plots import plot_speed

                print(f"wrote {plot_speed(result, args.plot)}")
            return 0
        if args.command == "sweep":
            from .ablation import SweepInterrupted, failed, format_rows, parse_grid, parse_settings, sweep

            if not args.grid and args.seeds is None:
                raise CompareError("give at least one --grid KEY=V1,V2 (a TrainConfig field and its values) "
                                   "or --seeds N")
            grid = parse_grid(args.grid)
            base = parse_settings(args.set)
            if args.analyze_against is not None:
                transformers_quiet()
            try:
                rows = sweep(base, grid, out_dir=args.out, max_steps=args.max_steps, progress=say,
                             seeds=args.seeds, force=args.force, jobs=args.jobs,
                             analyze_against=args.analyze_against, analyze_subspace=args.analyze_subspace)
            except SweepInterrupted as e:
                print(f"\n{e}", file=sys.stderr)
                return 130
            print(format_rows(rows))
            _print_summary(args.out)
            print(f"wrote {args.out}/results.csv, results.json, summary.csv, summary.json, results.png")
            bad = failed(rows)
            if bad:
                keys = [k for k in rows[0] if k in grid or k == "seed"]
                names = "; ".join(", ".join(f"{k}={r[k]}" for k in keys) + f" ({r['error']})" for r in bad)
                print(f"error: {len(bad)} of {len(rows)} settings failed: {names}", file=sys.stderr)
                return 1
            return 0
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before a sweep's first run, or during equivalence / speed
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
