"""TrainConfig: every knob of a run, the argparse CLI generated from it, and the checks of its values.

The dataclass below is the ONE list of options. Each field is declared with `_f(default, help, ...)`:
its default and help make the `--flag` (underscores become dashes, as in HF `TrainingArguments`;
booleans become `--flag / --no-flag`), and its valid values (`choices=`, or the bounds `gt= ge= lt=
le=`, floats always finite) make both the `--help` text and the check `check_config` runs before any
work. So `--help`, the check and its error message come from one definition, for the CLI, the Python
API and `compare sweep`'s grid values alike. To add an option: add one field here (and, if changing
it must not be allowed on resume, nothing else; see RESUME_MAY_CHANGE).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import TrainError

METHODS = ("lora", "ia3", "adalora", "adaption-prompt", "prompt-tuning")  # --method (lora_core's configs)
PROMPT_METHODS = ("adaption-prompt", "prompt-tuning")  # no weight delta: nothing to merge
BUILTIN_MODEL = "builtin:tiny-llama"  # the tiny Llama built from train/assets/tiny_llama.json
BUILTIN_DATASET = "builtin:tagger"  # train/assets/tagger.jsonl (scripts/make_tagger_data.py)
SEED_MAX = 2**32 - 1  # numpy's seed range (set_seed seeds numpy too)
FLOAT32_MAX = 3.4028234663852886e38  # torch's fp32 optimizer math raises on a larger learning rate


@dataclass(frozen=True)
class Bounds:
    """The valid range of a numeric option: value > gt, >= ge, < lt, <= le (None: no bound)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def __str__(self) -> str:
        lo = f"({_num(self.gt)}" if self.gt is not None else f"[{_num(self.ge)}" if self.ge is not None else None
        hi = f"{_num(self.lt)})" if self.lt is not None else f"{_num(self.le)}]" if self.le is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f"{'>' if lo[0] == '(' else '>='} {lo[1:]}"
        if hi:
            return f"{'<' if hi[-1] == ')' else '<='} {hi[:-1]}"
        return ""

    def accepts(self, v: float) -> bool:
        """Within the bounds (and finite, for a float)."""
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return ((self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
                and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le))

    def rule(self, floating: bool) -> str:
        """What `accepts` means, in words: '> 0', 'finite and in [0, 1)', ..."""
        return (f"finite and {self}" if str(self) else "finite") if floating else str(self)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def _f(default: Any, help: str, choices: tuple | None = None, *, gt: float | None = None,
       ge: float | None = None, lt: float | None = None, le: float | None = None, nonempty: bool = False,
       valid: str = "", check: Callable[[Any], str | None] | None = None):
    """A TrainConfig field: its default, CLI help and valid values (choices, numeric bounds, or a
    string that must not be empty; or `valid`, the rule in words, with `check(value)` returning what
    is wrong with a value, or None). Floats must also be finite."""
    return field(default=default, metadata={"help": help, "choices": choices, "bounds": Bounds(gt, ge, lt, le),
                                            "nonempty": nonempty, "valid": valid, "check": check})


# ---- the LoRA options that lora_core.LoraConfig validates ------------------------------------------
def lora_value(name: str, value: Any) -> Any:
    """A TrainConfig LoRA option as LoraConfig takes it: init_lora_weights "true"/"false" -> bool;
    comma lists -> lists ("" -> None); layers_to_transform -> ints; rank/alpha patterns: JSON
    objects. ValueError (naming the expected form) when the text cannot be read."""
    if name == "init_lora_weights":
        return {"true": True, "false": False}.get(value.lower(), value)
    if name in ("rank_pattern", "alpha_pattern"):
        try:
            out = json.loads(value or "{}")
        except json.JSONDecodeError:
            out = None
        if not isinstance(out, dict):
            raise ValueError(f'must be a JSON object {{"name regex": number}}, e.g. {{"down_proj": 4}}')
        return out
    items = [v.strip() for v in value.split(",") if v.strip()]
    if name == "layers_to_transform":
        if not all(v.lstrip("-").isdigit() for v in items):
            raise ValueError("must be comma-separated layer indices, e.g. 0,1,2")
        return [int(v) for v in items] or None
    return items or None  # exclude_modules, modules_to_save, layers_pattern


def _lora_check(name: str) -> Callable[[Any], str | None]:
    """check= for a LoRA option: what lora_core.LoraConfig says about this value on its own (rules
    that involve two options, e.g. lora_bias with use_dora, are checked with the whole config). The
    default is valid without asking: importing lora_core imports bitsandbytes, which logs a line
    about our `kernels` package (tests/test_name_clash.py), and a plain run's check stays silent."""
    def check(value: Any) -> str | None:
        if value == TrainConfig.__dataclass_fields__[name].default:
            return None
        from lora_core import LoraConfig

        try:
            kwargs = {name: lora_value(name, value)}
            if kwargs.get("init_lora_weights") == "loftq":
                kwargs["loftq_config"] = {"loftq_bits": 4, "loftq_iter": 1}
            LoraConfig(**kwargs)
        except (ValueError, TypeError) as e:
            return f"is not valid: {str(e).splitlines()[0]}"
        return None
    return check


INIT_CHOICES = "true, false, gaussian, orthogonal, pissa, pissa_niter_<N>, olora or loftq"


@dataclass
class TrainConfig:
    """One training run. Defaults are the embedded offline demo (`python -m train` with no flags)."""

    # --- model -------------------------------------------------------------------------------
    model: str = _f(BUILTIN_MODEL, "hub id or local directory of a causal LM (seq2seq when the config "
                    "is encoder-decoder); the default is a tiny Llama built from a config in the package",
                    nonempty=True)
    quantization: str = _f("none", "load the base through bitsandbytes: nf4 (double quant, bf16 "
                           "compute), fp4, int8 or none", ("none", "nf4", "fp4", "int8"))
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    bnb_4bit_quant_storage: str = _f("uint8", "dtype the packed 4-bit weights are stored in (transformers' "
                                     "name); --fsdp shards them only when it is a float dtype: use "
                                     "bfloat16, the compute dtype", ("uint8", "bfloat16", "float16", "float32"))
    fsdp: bool = _f(False, "shard the frozen base and the LoRA weights over the processes with FSDP2 "
                    "(through Accelerate); launch >= 2 processes with torchrun or accelerate launch")
    task: str = _f("lm", "lm: language modelling (causal, or seq2seq for an encoder-decoder --model); "
                   "seq-cls: sequence classification (the text is --text-template up to "
                   "--completion-separator, the class is --label-column; accuracy in the eval)",
                   ("lm", "seq-cls"))
    label_column: str = _f("label", "the column holding each row's class with --task seq-cls (one string "
                           "or integer per row)", nonempty=True)
    # --- LoRA --------------------------------------------------------------------------------
    r: int = _f(16, "LoRA rank", gt=0)
    lora_alpha: float = _f(32.0, "LoRA alpha; scaling = lora_alpha / r", gt=0)
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch input", ge=0, lt=1)
    target_modules: str = _f("all-linear", "comma-separated module names to adapt, or all-linear",
                             nonempty=True)
    backend: str = _f("auto", "LoRA forward/backward backend (triton needs CUDA, or TRITON_INTERPRET=1 on CPU); "
                      "--kernel is its old, deprecated name", ("auto", "torch", "triton"))
    use_rslora: bool = _f(False, "rsLoRA: scaling = lora_alpha / sqrt(r)")
    use_dora: bool = _f(False, "DoRA: a trained magnitude per output row times the direction of W + "
                        "scaling * B @ A (runs in PyTorch, not fused)")
    init_lora_weights: str = _f("true", "LoRA init, peft's names: true = A kaiming-uniform, B zeros; "
                                "orthogonal needs an even r; pissa, pissa_niter_<N> (fast SVD), olora and "
                                "loftq (see --loftq-bits) rewrite the base weight as peft does",
                                valid=INIT_CHOICES, check=_lora_check("init_lora_weights"))
    loftq_bits: int = _f(4, "LoftQ's quantization: 4 (nf4) or 8 (int8); with --init-lora-weights loftq", (4, 8))
    loftq_iter: int = _f(1, "LoftQ's alternating quantize / SVD iterations", ge=1)
    lora_bias: bool = _f(False, "a trained bias on lora_B (init true or false; not with --use-dora)")
    bias: str = _f("none", "base biases to train with the adapter", ("none", "all", "lora_only"))
    exclude_modules: str = _f("", "comma-separated module names never adapted (empty: none)",
                              check=_lora_check("exclude_modules"))
    modules_to_save: str = _f("", "comma-separated modules trained in full and saved with the adapter, "
                              "e.g. lm_head (empty: none)", check=_lora_check("modules_to_save"))
    layers_to_transform: str = _f("", "comma-separated layer indices to adapt (empty: all layers)",
                                  valid="comma-separated integers", check=_lora_check("layers_to_transform"))
    layers_pattern: str = _f("", "name of the layer list --layers-to-transform counts in, e.g. layers "
                             "(empty: peft's rule)", check=_lora_check("layers_pattern"))
    rank_pattern: str = _f("{}", 'JSON {"name regex": r} overriding --r per module, e.g. {"down_proj": 4}',
                           valid="a JSON object", check=_lora_check("rank_pattern"))
    alpha_pattern: str = _f("{}", 'JSON {"name regex": alpha} overriding --lora-alpha per module',
                            valid="a JSON object", check=_lora_check("alpha_pattern"))
    # --- the PEFT method (lora_core.methods); each method's flags say which method they belong to
    method: str = _f("lora", "PEFT method: lora; ia3 (learned per-feature scales); adalora (SVD-form LoRA "
                     "whose ranks are pruned while training); adaption-prompt (Llama-Adapter: prompts with "
                     "zero-init gates in the top attention layers); prompt-tuning (learned virtual tokens)",
                     METHODS)
    feedforward_modules: str = _f("", "ia3: comma-separated targets whose input (not output) is scaled; "
                                  "empty: peft's default for the architecture (e.g. down_proj)")
    init_r: int = _f(12, "adalora: starting rank of every adapted layer", gt=0)
    target_r: int = _f(8, "adalora: average rank per layer at the end", ge=0)
    tinit: int = _f(0, "adalora: steps before the ranks start to be pruned", ge=0)
    tfinal: int = _f(0, "adalora: last steps with the final ranks fixed", ge=0)
    deltaT: int = _f(1, "adalora: steps between two rank allocations", gt=0)
    beta1: float = _f(0.85, "adalora: EMA factor of the importance scores", gt=0, lt=1)
    beta2: float = _f(0.85, "adalora: EMA factor of their uncertainty", gt=0, lt=1)
    orth_reg_weight: float = _f(0.5, "adalora: weight of the orthogonality regulariser added to the "
                                "training loss", ge=0)
    adapter_len: int = _f(10, "adaption-prompt: prompt tokens per adapted layer", gt=0)
    adapter_layers: int = _f(0, "adaption-prompt: adapted attention layers, counted from the top "
                             "(0: every layer)", ge=0)
    num_virtual_tokens: int = _f(8, "prompt-tuning: virtual tokens prepended to every input", gt=0)
    prompt_tuning_init: str = _f("RANDOM", "prompt-tuning: RANDOM, SAMPLE_VOCAB (rows of the word "
                                 "embeddings) or TEXT (the embeddings of --prompt-tuning-init-text)",
                                 ("RANDOM", "SAMPLE_VOCAB", "TEXT"))
    prompt_tuning_init_text: str = _f("", "prompt-tuning: the text for --prompt-tuning-init TEXT")
    # --- data --------------------------------------------------------------------------------
    dataset: str = _f(BUILTIN_DATASET, "hub dataset name (online) or a local .json/.jsonl/.csv/"
                      ".parquet/.txt file or directory; the default is the bundled quote tagger set",
                      nonempty=True)
    text_template: str = _f("{quote} ->: {tags}", "str.format template building each text from columns",
                            nonempty=True)
    completion_separator: str = _f(" ->: ", "text in the template that ends the prompt; the completion "
                                   "follows it (used by --completion-only-loss and the tag score)")
    completion_only_loss: bool = _f(True, "train only on the completion after --completion-separator "
                                    "(labels -100 on the prompt)")
    max_length: int = _f(128, "truncate each tokenized text to this many tokens", gt=0)
    packing: bool = _f(False, "concatenate texts and cut them into --max-length blocks")
    eval_split_size: float = _f(0.1, "fraction held out for eval when the dataset has no eval split",
                                gt=0, lt=1)
    # --- optimisation ------------------------------------------------------------------------
    max_steps: int = _f(500, "optimizer steps to run; <= 0 means use --num-train-epochs")
    num_train_epochs: float = _f(3.0, "epochs to run when --max-steps <= 0", ge=0)
    per_device_train_batch_size: int = _f(16, "micro-batch size per process", gt=0)
    per_device_eval_batch_size: int = _f(32, "eval batch size per process", gt=0)
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step", gt=0)
    learning_rate: float = _f(3e-3, "peak learning rate of AdamW", gt=0, le=FLOAT32_MAX)
    loraplus_lr_ratio: float = _f(0.0, "LoRA+: lora_B (and 1-D adapter tensors) learn at this times "
                                  "--learning-rate, peft's create_loraplus_optimizer (0: off)", ge=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    warmup_steps: int = _f(50, "linear warm-up steps", ge=0)
    lr_scheduler_type: str = _f("linear", "schedule after warm-up (transformers.get_scheduler)",
                                ("linear", "cosine", "constant", "constant_with_warmup"))
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (<= 0: no clipping)")
    mixed_precision: str = _f("no", "autocast dtype for the forward", ("no", "fp16", "bf16"))
    torch_compile: bool = _f(False, "compile the model with torch.compile (Inductor) before training, as "
                             "transformers' --torch_compile; the LoRA layers compile without graph breaks")
    torch_compile_mode: str = _f("default", "torch.compile mode with --torch-compile",
                                 ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    cpu_threads: int = _f(0, "torch CPU threads per process; 0 = auto (1 for the built-in tiny model, "
                          "whose ops are too small to split; torch's default otherwise)", ge=0)
    seed: int = _f(42, "seed for the model init, LoRA init, data order and dropout", ge=0, le=SEED_MAX)
    # --- logging, eval, checkpoints, outputs -------------------------------------------------
    output_dir: str = _f("runs/lorafuse", "where log.jsonl, loss.png, checkpoints and the adapter go",
                         nonempty=True)
    overwrite_output_dir: bool = _f(False, "replace the earlier run in --output-dir (it is kept until "
                                    "this run writes its first checkpoint or finishes)")
    logging_steps: int = _f(25, "log the train loss every N optimizer steps", gt=0)
    eval_steps: int = _f(100, "evaluate every N optimizer steps (<= 0: only before and after)")
    save_steps: int = _f(100, "checkpoint every N optimizer steps and at the last step (<= 0: no "
                         "checkpoints)")
    save_total_limit: int = _f(2, "keep only the last N checkpoints (<= 0: keep all)")
    resume_from_checkpoint: str = _f("", "latest or a checkpoint directory to continue a run from")
    tag_eval_samples: int = _f(64, "eval prompts for the exact-match completion (tag) score; 0 = skip", ge=0)
    num_sample_generations: int = _f(3, "eval prompts whose generations are printed at the end", ge=0)
    max_new_tokens: int = _f(32, "generation length for the tag score and the samples", gt=0)
    merge: bool = _f(False, "also write a merged full model + tokenizer to <output-dir>/merged")
    report_to: str = _f("auto", "tensorboard, none, or auto (tensorboard when installed)",
                        ("auto", "tensorboard", "none"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields a resumed run may set differently from its checkpoint: they change what is logged,
# evaluated, saved or printed, where outputs go, or how fast the same math runs, never the training
# itself. Every other field defines the training (the model, the data and its order, the LoRA
# layers, the optimizer and schedule, the numerics): a resume with another value is refused.
# max_steps / num_train_epochs may change (a run can be extended or ended earlier), but the run
# must not end before the checkpoint's step; note the schedule then decays to the new length.
RESUME_MAY_CHANGE = frozenset({
    "max_steps", "num_train_epochs",                                      # the run's length
    "logging_steps", "eval_steps", "save_steps", "save_total_limit",      # cadence
    "per_device_eval_batch_size", "tag_eval_samples", "num_sample_generations", "max_new_tokens",  # eval
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "merge", "report_to",  # outputs
    "cpu_threads", "backend", "gradient_checkpointing",                   # speed/memory, same math
    "torch_compile", "torch_compile_mode",            # the same math, compiled (other roundings)
    "fsdp", "bnb_4bit_quant_storage",                # sharding, the packed bytes' dtype: same math
})


# Old spellings of a flag, still accepted (with a note on stderr): the knob's one word is "backend".
OLD_FLAGS = {"--backend": ("--kernel",)}
OLD_FIELDS = {"kernel": "backend"}  # the same, as a TrainConfig field name (compare sweep's keys)


def note_old_flags(argv: list[str]) -> None:
    """One stderr note per old flag spelling in argv (train's and compare's parsers accept both)."""
    for new, olds in OLD_FLAGS.items():
        if any(a in olds or a.startswith(tuple(o + "=" for o in olds)) for a in argv):
            print(f"note: {' / '.join(olds)} is deprecated: use {new}", file=sys.stderr)


def flag(name: str) -> str:
    """The CLI flag of a TrainConfig field: learning_rate -> --learning-rate."""
    return "--" + name.replace("_", "-")


def fields() -> dict[str, dataclasses.Field]:
    """TrainConfig's fields by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _type(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def rule(f: dataclasses.Field) -> str:
    """What values `f` accepts, as --help and the error messages say it ('' when any value of its
    type is fine)."""
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(map(str, m["choices"]))
    if m.get("valid"):
        return m["valid"]
    if _type(f) in ("int", "float"):
        return (m.get("bounds") or Bounds()).rule(_type(f) == "float")
    return "not empty" if m.get("nonempty") else ""


def value_problem(f: dataclasses.Field, value: Any) -> str | None:
    """Why `value` is not valid for field `f` ('must be > 0'), or None when it is."""
    t = _type(f)
    m = f.metadata
    if t == "bool":
        ok = isinstance(value, bool)
    elif t == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        return f"must be {'an integer' if t == 'int' else 'a number' if t == 'float' else 'a ' + t}"
    if m.get("choices") and value not in m["choices"]:
        return f"must be {rule(f)}"
    if t in ("int", "float") and not (m.get("bounds") or Bounds()).accepts(float(value) if t == "float" else value):
        return f"must be {rule(f)}"
    if m.get("nonempty") and not value.strip():
        return "must not be empty"
    if m.get("check"):
        return m["check"](value)
    return None


def lora_kwargs(cfg: TrainConfig) -> dict:
    """The lora_core.LoraConfig keyword arguments of a run's LoRA options (task_type aside)."""
    as_is = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "lora_bias", "bias")
    parsed = ("init_lora_weights", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern",
              "rank_pattern", "alpha_pattern")
    out = {n: getattr(cfg, n) for n in as_is} | {n: lora_value(n, getattr(cfg, n)) for n in parsed}
    tm = cfg.target_modules
    out["target_modules"] = tm if tm == "all-linear" else [t.strip() for t in tm.split(",") if t.strip()]
    if out["init_lora_weights"] == "loftq":
        out["loftq_config"] = {"loftq_bits": cfg.loftq_bits, "loftq_iter": cfg.loftq_iter}
    return out


def check_config(cfg: TrainConfig) -> None:
    """Raise TrainError for the first invalid field (its flag, the rule, the value), then for
    invalid combinations. Pure: reads no file, writes nothing."""
    for name, f in fields().items():
        value = getattr(cfg, name)
        problem = value_problem(f, value)
        if problem:
            raise TrainError(f"{flag(name)} {problem} (got {value!r})")
    if cfg.max_steps <= 0 and cfg.num_train_epochs <= 0:
        raise TrainError(f"set --max-steps > 0 or --num-train-epochs > 0 (got {cfg.max_steps} and "
                         f"{cfg.num_train_epochs})")
    check_method(cfg)


# The LoRA variant options (issue 13): only --method lora reads them
LORA_OPTIONS = ("use_rslora", "use_dora", "init_lora_weights", "loftq_bits", "loftq_iter", "lora_bias", "bias",
                "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern", "rank_pattern",
                "alpha_pattern", "loraplus_lr_ratio")


def check_method(cfg: TrainConfig) -> None:
    """The combinations a --method cannot take (its own values are checked by their fields)."""
    if cfg.method != "lora":
        given = [flag(n) for n in LORA_OPTIONS if getattr(cfg, n) != fields()[n].default]
        if given:
            raise TrainError(f"{', '.join(given)}: LoRA option(s) that --method {cfg.method} does not take; "
                             f"drop them or use --method lora")
    if cfg.method == "adalora":
        if cfg.max_steps > 0 and cfg.tinit >= cfg.max_steps - cfg.tfinal:
            raise TrainError(f"--tinit {cfg.tinit} and --tfinal {cfg.tfinal} leave no steps for adalora's rank "
                             f"allocation in --max-steps {cfg.max_steps} (need tinit < max_steps - tfinal)")
        if cfg.resume_from_checkpoint:
            raise TrainError("--resume-from-checkpoint with --method adalora: a checkpoint does not hold the "
                             "rank allocator's importance averages, so the resumed run would prune differently; "
                             "rerun from the start")
    if cfg.method in PROMPT_METHODS and cfg.merge:
        raise TrainError(f"--merge with --method {cfg.method}: a prompt method adds tokens or attention terms, "
                         f"not a weight change, so there is no merged model; drop --merge")
    if cfg.prompt_tuning_init == "TEXT" and not cfg.prompt_tuning_init_text.strip():
        raise TrainError("--prompt-tuning-init TEXT needs --prompt-tuning-init-text")
    if cfg.torch_compile and cfg.method != "lora":
        raise TrainError(f"--torch-compile with --method {cfg.method}: compiled training is built and tested for "
                         f"--method lora (adalora's rank pruning would recompile at every allocation); use "
                         f"--method lora or no --torch-compile")
    if cfg.torch_compile_mode != "default" and not cfg.torch_compile:
        raise TrainError(f"--torch-compile-mode {cfg.torch_compile_mode} needs --torch-compile")
    if cfg.task == "seq-cls" and cfg.method in PROMPT_METHODS:
        raise TrainError(f"--task seq-cls with --method {cfg.method}: the new classification head must train in "
                         f"full, which lorafuse's prompt methods do not do; use --method lora, ia3 or adalora")


def resume_mismatches(stored: dict, cfg: TrainConfig) -> list[str]:
    """Training-defining fields whose value differs from the checkpoint's, as 'field: old -> new'.

    A field the stored config lacks (a checkpoint from before the field existed) is compared with
    its default, the value such a run used.
    """
    out = []
    for name, f in fields().items():
        if name in RESUME_MAY_CHANGE:
            continue
        old = stored.get(name, f.default)
        new = getattr(cfg, name)
        if old != new:
            out.append(f"{name}: {old!r} -> {new!r}")
    return out


class _DefaultsFormatter(argparse.HelpFormatter):
    """Append every flag's default to its help; strings quoted so ' ->: ' shows its spaces."""

    def _get_help_string(self, action):
        if action.default is argparse.SUPPRESS or action.dest == "help":
            return action.help
        fmt = "%(default)r" if isinstance(action.default, str) else "%(default)s"
        return f"{action.help} (default: {fmt})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with bad input as one line, `error: <what> (<prog> --help lists the flags)`, exit 2:
    argparse's own form prints the whole usage block first (dozens of lines for train). Subparsers
    are built from this class too (add_subparsers uses the parent's type)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} ({self.prog} --help lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one `--flag` per TrainConfig field; --help shows each flag's valid
    values and default. Values are only converted here; `check_config` checks them (one message
    format for the CLI and the Python API)."""
    p = ArgumentParser(
        prog="python -m train",
        description="LoRA fine-tuning with an explicit Accelerate loop. With no flags: the offline "
                    "demo (tiny Llama, bundled quote->tags data, before/after eval). Exit codes: 0 done, "
                    "1 the run stopped (diverged, or its outputs could not be written), 2 bad input "
                    "(found before any work), 130 interrupted.",
        formatter_class=_DefaultsFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        help_text = meta["help"]
        if _type(f) == "bool":
            p.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                           default=f.default, help=help_text)
            continue
        if not meta["choices"] and rule(f) and rule(f) != "not empty":
            help_text += f"; must be {rule(f)}"
        p.add_argument(flag(f.name), *OLD_FLAGS.get(flag(f.name), ()), dest=f.name,
                       type={"int": int, "float": float, "str": str}[_type(f)],
                       default=f.default, help=help_text, choices=meta["choices"])
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse CLI arguments into a TrainConfig (types only; `check_config` checks the values)."""
    argv = sys.argv[1:] if argv is None else argv
    note_old_flags(argv)
    ns = build_parser().parse_args(argv)
    return TrainConfig(**vars(ns))
