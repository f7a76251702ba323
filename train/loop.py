"""The training loop: one function, top to bottom, in Accelerate's order.

    Accelerator -> seed -> data -> model -> optimizer + schedule -> one prepare -> [resume] ->
    eval before -> per step: accumulate/backward over the micro-batches, clip, step, schedule,
    zero_grad, log, eval, checkpoint -> eval after -> samples -> adapter (+ merged model) -> plot.

`run(cfg)` checks the input first (`preflight`: nothing is loaded or written before the checks
pass), then calls `train_loop`. Only the main process writes files; every process calls save_state
(RNG states). A step whose loss, gradient norm or updated weights are non-finite stops the run
before anything of it is written; every folder is built aside and swapped in (train/outputs.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradientAccumulationPlugin, TorchDynamoPlugin, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import data as D
from . import fsdp
from . import outputs
from .config import BUILTIN_MODEL, TrainConfig, check_config
from .errors import TrainDiverged, TrainError, TrainFailed, TrainInterrupted
from .evaluate import eval_loss, exact_match, generate_completions, plot_losses, token_losses
from .models import (bitsandbytes_problem, check_target_modules, is_seq2seq, load_base_model, load_tokenizer,
                     lora_config)

__all__ = ["run", "preflight", "train_loop", "TrainResult", "TrainError", "TrainFailed", "TrainDiverged",
           "TrainInterrupted"]


@dataclass
class TrainResult:
    """What a run produced. `before`/`after`: eval_loss, perplexity, tag_exact_match (--task lm) or
    eval_loss, accuracy, tag_exact_match None (--task seq-cls)."""

    output_dir: Path
    adapter_dir: Path
    merged_dir: Path | None
    before: dict
    after: dict
    log: list[dict] = field(default_factory=list)  # every log.jsonl record, in order
    samples: list[dict] = field(default_factory=list)  # {prompt, generated, reference}
    steps: int = 0
    train_seconds: float = 0.0


def run(cfg: TrainConfig) -> TrainResult:
    """Train a LoRA adapter as `cfg` says; the Python API behind `python -m train`.

    Raises TrainError (one-line message) on bad input before doing any work, TrainFailed when the
    run stops after it started (TrainDiverged: a non-finite loss, gradient or weight; or outputs
    that cannot be written), TrainInterrupted on Ctrl-C. Tears the process group down at the end,
    so call it once per process.
    """
    resume_path = preflight(cfg)
    try:
        return train_loop(cfg, resume_path)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # else torchrun sees workers die with SIGABRT


def preflight(cfg: TrainConfig) -> Path | None:
    """Check everything that can be checked without loading data or weights; returns the checkpoint
    to resume from. Every value against its definition (train.config), the machine (bitsandbytes,
    CUDA, triton, tensorboard), the output folder (writable, no earlier run unless resumed or
    --overwrite-output-dir), the checkpoint (complete, readable, same training settings), the
    model's config and --target-modules. Writes nothing of its own; what an interrupted earlier run
    left in --output-dir is resolved first (outputs.recover) so the checks see complete folders."""
    check_config(cfg)
    problem = bitsandbytes_problem(cfg.quantization)
    if problem:
        raise TrainError(f"--quantization {cfg.quantization} needs bitsandbytes, but {problem}; "
                         f"install a bitsandbytes build for this machine or use --quantization none")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TrainError("--mixed-precision fp16 needs a CUDA GPU (fp16 gradient scaling); "
                         "use bf16 or no on CPU")
    if cfg.backend == "triton":
        problem = _triton_problem()
        if problem:
            raise TrainError(f"--backend triton {problem}; use --backend auto (triton where it can run) or torch")
        problem = _triton_precision_problem(cfg)
        if problem:
            raise TrainError(problem)
        if cfg.use_dora:  # the layer would refuse at the first forward; say it before any work
            raise TrainError("--backend triton cannot run --use-dora: the triton kernels do not fuse DoRA's "
                             "magnitude / norm scale; use --backend auto (the DoRA term in PyTorch) or torch")
    fsdp.check(cfg)
    if cfg.torch_compile and fsdp.wanted(cfg):
        raise TrainError("--torch-compile with FSDP: compiled sharded training was not built or tested here; "
                         "use one of them")
    if cfg.report_to == "tensorboard" and not _tensorboard_installed():
        raise TrainError("--report-to tensorboard needs the tensorboard package; install it or use "
                         "--report-to auto")
    out = Path(cfg.output_dir)
    _check_writable(out)
    if _rank() == 0:
        outputs.recover(out)
    resume = ckpt.resolve_resume(cfg.resume_from_checkpoint, out)
    if resume is not None:
        ckpt.check_checkpoint(resume, cfg, int(os.environ.get("WORLD_SIZE", "1")))
    outputs.check_output_dir(out, cfg.overwrite_output_dir, resume)
    check_target_modules(cfg)  # reads the model's config.json: the first check that --model exists
    return resume


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _triton_problem() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"needs the triton package ({e})"
    # On CPU tensors triton runs only through its interpreter, which triton reads from the
    # environment when it is imported (kernels.triton.interpreting reads it the same way).
    from kernels.triton import interpreting

    if not torch.cuda.is_available() and not interpreting():
        return ("needs a CUDA GPU, or TRITON_INTERPRET=1 in the environment to run Triton's CPU "
                "interpreter (slow, for tests)")
    return None


def _triton_precision_problem(cfg: TrainConfig) -> str | None:
    # The base loads in fp32; only autocast hands the kernels the fp16/bf16 activations they take.
    if cfg.backend == "triton" and cfg.mixed_precision == "no":
        return ("--backend triton takes fp16/bf16 activations, and without autocast they are fp32: add "
                "--mixed-precision bf16, or use --backend auto")
    return None


def _bare(accelerator, model):
    """The LoraModel inside Accelerate's wrappers, torch.compile's included (generation and saving
    run eagerly, under the model's own parameter names)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def _dynamo_plugin(cfg: TrainConfig) -> TorchDynamoPlugin:
    """--torch-compile: prepare() compiles the model with Inductor (as transformers' Trainer has
    Accelerate do). dynamic=None: a batch of a new sequence length recompiles once, with that
    dimension dynamic from then on. Without the flag, Accelerate's own default (its environment)."""
    if not cfg.torch_compile:
        return TorchDynamoPlugin()
    return TorchDynamoPlugin(backend="inductor", mode=cfg.torch_compile_mode, dynamic=None)


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise TrainError(f"--output-dir {out} exists and is not a directory; choose another path")
    why = outputs.unwritable_reason(out)
    if why:
        raise TrainError(f"--output-dir {out} {why}; choose a writable path")


def train_loop(cfg: TrainConfig, resume_path: Path | None = None) -> TrainResult:
    """The loop itself. Call `run` instead unless `preflight` already ran."""
    out = Path(cfg.output_dir)
    accum = cfg.gradient_accumulation_steps
    use_tb = cfg.report_to == "tensorboard" or (cfg.report_to == "auto" and _tensorboard_installed())

    if cfg.cpu_threads > 0 or cfg.model == BUILTIN_MODEL:
        # Tiny matmuls gain nothing from intra-op threads, and on a shared CPU spinning threads
        # made a step ~30x slower (measured: 0.08 s -> 2.5 s per step of the demo model).
        torch.set_num_threads(cfg.cpu_threads if cfg.cpu_threads > 0 else 1)

    # Accelerate keeps process-wide singletons; a second run in one process (an ablation loop) with
    # another mixed precision or accumulation would be refused. Keep PartialState (the process
    # group), drop the rest.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()

    # 1. Accelerator. sync_with_dataloader=False: every optimizer step is a full window of `accum`
    # micro-batches (the sampler trims each epoch), and the loop fetches a window before running it,
    # which would otherwise make Accelerate see "end of data" one window early.
    # step_scheduler_with_optimizer=False: Accelerate would step the schedule once per process.
    fsdp_plugin = fsdp.build_plugin(cfg)  # None unless --fsdp or an Accelerate config enables FSDP
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accum, sync_with_dataloader=False),
        mixed_precision=cfg.mixed_precision, step_scheduler_with_optimizer=False,
        log_with="tensorboard" if use_tb else None, project_dir=str(out),
        # torchrun on a machine without GPUs: Accelerate picks gloo (MULTI_CPU) only when told cpu.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        fsdp_plugin=fsdp_plugin, dynamo_plugin=_dynamo_plugin(cfg))
    fsdp.enable_on_cpu(accelerator, fsdp_plugin)
    sharded = fsdp.is_sharded(accelerator)
    main = accelerator.is_main_process
    world = accelerator.num_processes

    # 2. Seed: model init, LoRA init and dropout all draw from here.
    set_seed(cfg.seed)

    # 3. Data. The main process loads and tokenizes first (and fills the datasets cache), the others
    # then read it. Checks on the data raise before the model is loaded.
    seq2seq = is_seq2seq(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    global_batch = cfg.per_device_train_batch_size * world * accum
    classify = cfg.task == "seq-cls"
    with accelerator.main_process_first():
        raw = D.load_raw(cfg.dataset)
        train_raw, eval_raw = D.split_eval(raw, cfg.dataset, cfg.eval_split_size, cfg.seed)
        # a classifier reads the template's prompt part; its class comes from --label-column
        text_tpl = D.classification_text(cfg.text_template, cfg.completion_separator) if classify \
            else cfg.text_template
        D.check_template(text_tpl, train_raw.column_names, cfg.completion_separator,
                         not classify and (cfg.completion_only_loss or seq2seq))
        D.check_rows(raw, text_tpl, cfg.dataset)
        _check_fits(len(train_raw), global_batch, cfg, world, "rows")
        if classify:
            classes = D.class_ids(raw, cfg.label_column, cfg.dataset)
            if cfg.label_column in D.template_fields(text_tpl):
                raise TrainError(f"--text-template's text {text_tpl!r} names --label-column {cfg.label_column!r}: "
                                 f"the classifier would read its answer")
            train_tok, eval_tok = (D.tokenize_classification(r, tokenizer, text_tpl, cfg.label_column, classes,
                                                             cfg.max_length) for r in (train_raw, eval_raw))
        elif seq2seq:
            train_tok = D.tokenize_seq2seq(train_raw, tokenizer, cfg.text_template,
                                           cfg.completion_separator, cfg.max_length)
            eval_tok = D.tokenize_seq2seq(eval_raw, tokenizer, cfg.text_template,
                                          cfg.completion_separator, cfg.max_length)
        else:
            tok = dict(tokenizer=tokenizer, template=cfg.text_template, separator=cfg.completion_separator,
                       completion_only=cfg.completion_only_loss, max_length=cfg.max_length)
            train_tok, eval_tok = D.tokenize_causal(train_raw, **tok), D.tokenize_causal(eval_raw, **tok)
        if not classify:
            D.check_targets({"train": train_tok, "eval": eval_tok}, 0 if seq2seq else 1, cfg.max_length,
                            warn=main)
        if cfg.packing and not seq2seq and not classify:
            train_tok, eval_tok = D.pack(train_tok, cfg.max_length), D.pack(eval_tok, cfg.max_length)
            _check_fits(len(train_tok), global_batch, cfg, world, "packed blocks")
            if len(eval_tok) == 0:
                raise TrainError(f"the eval split packs into 0 blocks of {cfg.max_length} tokens; "
                                 f"lower --max-length or use --no-packing")
    collate = D.Collator(tokenizer.pad_token_id)
    sampler = D.EpochShuffleSampler(len(train_tok), cfg.seed, global_batch)
    # Own generators: a DataLoader draws a base seed whenever an iterator starts, from the global
    # RNG unless given one; that draw would shift the dropout masks of a resumed run.
    train_dl = DataLoader(train_tok, batch_size=cfg.per_device_train_batch_size, sampler=sampler,
                          collate_fn=collate, generator=torch.Generator().manual_seed(cfg.seed))
    eval_dl = DataLoader(eval_tok, batch_size=cfg.per_device_eval_batch_size, collate_fn=collate,
                         generator=torch.Generator().manual_seed(cfg.seed))
    prompt_tpl = None if classify else D.split_template(cfg.text_template, cfg.completion_separator)
    n_tag = min(cfg.tag_eval_samples, len(eval_raw)) if prompt_tpl else 0
    tag_rows = eval_raw.select(range(max(n_tag, min(cfg.num_sample_generations, len(eval_raw)))))
    tag_rows = tag_rows.to_dict() if len(tag_rows) else {}
    prompts = D.render(prompt_tpl, tag_rows) if prompt_tpl and tag_rows else []
    refs = [t[len(p):] for t, p in zip(D.render(cfg.text_template, tag_rows), prompts)] if prompts else []

    # 4. Model: frozen base (maybe quantized) -> kbit preparation -> LoRA layers.
    from lora_core import prepare_model_for_kbit_training

    # Under FSDP a quantized base is loaded on the CPU and FSDP moves each process's shards to its
    # device (the whole quantized model need not fit one GPU); unquantized bases load on the CPU anyway.
    base = load_base_model(cfg.model, cfg.quantization, cfg.seed, "cpu" if sharded else accelerator.device,
                           cfg.bnb_4bit_quant_storage, num_labels=len(classes) if classify else None)
    if classify:  # the head reads the last real token: it needs the pad id; the classes keep their names
        base.config.pad_token_id = tokenizer.pad_token_id
        base.config.id2label = {i: str(v) for v, i in classes.items()}
        base.config.label2id = {str(v): i for v, i in classes.items()}
    if cfg.quantization != "none":
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grads
    steps_per_epoch = len(sampler) // global_batch  # exact: the sampler trims to full global batches
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    peft_cfg = lora_config(cfg, seq2seq, total_steps)
    try:
        model = _build_lora(cfg, base, peft_cfg, tokenizer)
    except ValueError as e:  # preflight matched the targets on the model's skeleton; this is the real one
        raise TrainError(f"--target-modules {cfg.target_modules}: {str(e).splitlines()[0]}") from None
    model.set_backend(cfg.backend)
    lora = model  # the LoraModel itself (`model` becomes Accelerate's wrapper after prepare)
    if main:
        model.print_trainable_parameters()

    # 5. Optimizer over the trainable (adapter) parameters only, warm-up + decay schedule.
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.loraplus_lr_ratio > 0:  # LoRA+: peft's four parameter groups (lora_B at ratio x lr)
        from lora_core import create_loraplus_optimizer
        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.learning_rate,
                                              loraplus_lr_ratio=cfg.loraplus_lr_ratio,
                                              loraplus_weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = transformers.get_scheduler(cfg.lr_scheduler_type, optimizer,
                                           num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)

    # 6. One prepare: DDP wrapping (or FSDP2 sharding), device placement, per-process data sharding,
    # autocast (FSDP: its mixed-precision policy instead).
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(
        model, optimizer, train_dl, eval_dl, scheduler)
    if sharded and main:
        print(fsdp.describe(model, world))
    trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP replaced them by sharded ones
    ckpt.register_hooks(accelerator)  # checkpoints hold the LoRA weights, not the frozen base
    # fp16's GradScaler skips a step whose gradients overflowed and lowers its scale: an inf
    # gradient norm is routine there, so only the loss and the weights are guarded.
    guard_grads = accelerator.scaler is None

    # 7. Resume (checked whole by preflight), or evaluate the untouched model ("before").
    step, log, last_ckpt = 0, [], None
    if resume_path is not None:
        try:
            state = ckpt.load_checkpoint(accelerator, resume_path)
        except TrainError:
            raise
        except Exception as e:
            raise TrainError(f"checkpoint {resume_path} could not be loaded "
                             f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None
        step, log, before, last_ckpt = state["step"], state["log"], state["before"], resume_path
        if step > total_steps:
            raise TrainError(f"this run has {total_steps} steps but the checkpoint is at step {step}; "
                             f"raise --max-steps or --num-train-epochs")
        _follow_schedule(scheduler)
    else:
        before = eval_loss(model, eval_dl, accelerator, seq2seq)
        before["tag_exact_match"] = _tag_score(accelerator, model, tokenizer, prompts[:n_tag], refs[:n_tag],
                                              cfg, seq2seq)
        log.append({"step": 0, **before})

    # From here on the run writes. With --overwrite-output-dir the earlier run is set aside now and
    # deleted only once this run is valid (its first checkpoint or its adapter); any failure before
    # that brings it back (outputs.Replacement).
    resumes_here = resume_path is not None and resume_path.resolve().parent == out.resolve()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    with outputs.Replacement(out, active=main and cfg.overwrite_output_dir and not resumes_here) as replacing:
        def record(rec: dict) -> None:
            log.append(rec)
            if main:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
            accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

        # 8. Train. Each optimizer step runs `accum` micro-batches per process; the loss is the sum of
        # token losses over the whole global batch divided by its token count, so 4x1, 1x4 and
        # 2 processes x 2 compute the same gradient. Before a step changes the weights, its loss and
        # gradient norm must be finite, and after it the weights: else the run stops there
        # (TrainDiverged) and nothing of that step is written.
        bar = tqdm(total=total_steps, initial=step, disable=not main, desc="train", dynamic_ncols=True)
        try:
            if main:
                _write_log(out / "log.jsonl", log)  # fresh: just "before"; resumed: history up to the checkpoint
            if use_tb:
                accelerator.init_trackers("lorafuse", config={k: v for k, v in cfg.to_dict().items()
                                                              if isinstance(v, (int, float, str, bool))})
                for rec in log:
                    accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])
            model.train()
            t_start = time.perf_counter()
            t_log, tokens_since, loss_since, n_since = time.perf_counter(), 0, 0.0, 0
            while step < total_steps:
                epoch, done_in_epoch = divmod(step, steps_per_epoch)
                train_dl.set_epoch(epoch)  # the sampler's permutation is a function of (seed, epoch)
                # Resuming mid-epoch: skip the micro-batches the checkpointed run already consumed.
                batches = iter(accelerator.skip_first_batches(train_dl, done_in_epoch * accum)
                               if done_in_epoch else train_dl)
                for _ in range(done_in_epoch, steps_per_epoch):
                    window = [next(batches) for _ in range(accum)]
                    shift = 0 if seq2seq else 1
                    n_tok = sum(D.target_count(b["labels"], shift) for b in window)
                    n_tok_all = accelerator.reduce(n_tok.clone(), reduction="sum").clamp(min=1)  # sync point
                    loss_sum = torch.zeros((), device=accelerator.device)
                    for batch in window:
                        with accelerator.accumulate(model):
                            s, _ = token_losses(model, batch, seq2seq)
                            # backward divides by accum and DDP averages over processes: undo both.
                            objective = s.sum() * (accum * world) / n_tok_all
                            reg = lora.training_regulariser()  # AdaLoRA's orthogonality term, else None
                            if reg is not None:  # once per step: each micro-batch adds reg / accum
                                objective = objective + reg
                            accelerator.backward(objective)
                            loss_sum += s.sum().detach()
                        tokens_since += int(batch["attention_mask"].sum()) * world
                    # sync_gradients is True after the window's last micro-batch: grads are complete.
                    loss = (accelerator.reduce(loss_sum, reduction="sum") / n_tok_all).item()
                    grad_norm = _grad_norm(accelerator, model, trainable, cfg.max_grad_norm, guard_grads)
                    if not math.isfinite(loss):
                        raise TrainDiverged(step + 1, f"the loss is {loss}", last_ckpt)
                    if grad_norm is not None and guard_grads and not math.isfinite(grad_norm):
                        raise TrainDiverged(step + 1, f"the gradient norm is {grad_norm}", last_ckpt)
                    optimizer.step()
                    scheduler.step()
                    if cfg.method == "adalora":  # importance from this step's gradients, then prune
                        lora.update_and_allocate(step + 1)
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    finite = fsdp.all_finite(accelerator, trainable, _all_finite) if sharded else \
                        _all_finite(trainable)
                    if not finite:
                        raise TrainDiverged(step, "the optimizer step made LoRA weights non-finite (is "
                                            "--learning-rate too high?)", last_ckpt)
                    loss_since += loss
                    n_since += 1

                    bar.update(1)
                    if step % cfg.logging_steps == 0 or step == total_steps:
                        dt = time.perf_counter() - t_log
                        rec = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                               "loss": loss_since / n_since, "lr": scheduler.get_last_lr()[0],
                               "tokens_per_s": tokens_since / max(dt, 1e-9)}
                        if grad_norm is not None:
                            rec["grad_norm"] = grad_norm
                        record(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                        tok_s=f"{rec['tokens_per_s']:.0f}")
                        t_log, tokens_since, loss_since, n_since = time.perf_counter(), 0, 0.0, 0
                    if cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and step < total_steps:
                        record({"step": step, **eval_loss(model, eval_dl, accelerator, seq2seq)})
                    if cfg.save_steps > 0 and (step % cfg.save_steps == 0 or step == total_steps):
                        state = {"step": step, "epoch": step / steps_per_epoch, "log": log, "before": before,
                                 "config": cfg.to_dict(), "world_size": world}
                        last_ckpt = ckpt.save_checkpoint(accelerator, out, step, state, cfg.save_total_limit)
                        replacing.commit()  # a checkpoint of this run exists: it is valid
                    if step >= total_steps:
                        break
            bar.close()
            train_seconds = time.perf_counter() - t_start

            # 9. Evaluate after, sample, save the adapter (PEFT format) and optionally the merged model.
            after = eval_loss(model, eval_dl, accelerator, seq2seq)
            after["tag_exact_match"] = _tag_score(accelerator, model, tokenizer, prompts[:n_tag], refs[:n_tag],
                                                 cfg, seq2seq)
            record({"step": step, **after})
            samples = []
            k = min(cfg.num_sample_generations, len(prompts))
            if (main or sharded) and k:  # under FSDP every process takes part in each forward
                gen = generate_completions(_bare(accelerator, model), tokenizer, prompts[:k],
                                           cfg.max_new_tokens, seq2seq, synced_gpus=sharded)
                samples = [{"prompt": p, "generated": g, "reference": r}
                           for p, g, r in zip(prompts[:k], gen, refs[:k])] if main else []
            accelerator.wait_for_everyone()
            failure = None
            # Under FSDP the LoRA weights are gathered whole on every process (a collective) for the
            # main process to write them; nothing else runs a forward meanwhile.
            with fsdp.whole_trainable(model) if sharded else contextlib.nullcontext():
                if main:
                    failure = _write_outputs(cfg, _bare(accelerator, model), tokenizer, out, log, step,
                                             last_ckpt, replacing)
            _raise_if_any(accelerator, failure)  # every process stops when the main one could not write
        except KeyboardInterrupt:
            raise TrainInterrupted(step, last_ckpt) from None
        except OSError as e:  # a full disk or a read-only file while training: say what is kept
            raise TrainFailed(f"could not write {e.filename or out} ({e.strerror}); "
                              + (f"the last complete checkpoint is {last_ckpt}" if last_ckpt else
                                 "no checkpoint of this run was written"), last_ckpt) from None
        finally:
            bar.close()
    adapter_dir, merged_dir = out / "adapter", (out / "merged" if cfg.merge else None)
    if main:
        _print_summary(before, after, samples, out, train_seconds, step, merged_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(out, adapter_dir, merged_dir, before, after, log, samples, step, train_seconds)


def _build_lora(cfg: TrainConfig, base, peft_cfg, tokenizer):
    """get_lora_model(base, peft_cfg). Prompt tuning's TEXT init reads the run's tokenizer from a
    folder; the built-in char tokenizer has none, so it is saved to a temporary one, and the saved
    config keeps --model as tokenizer_name_or_path (what peft would record)."""
    from lora_core import get_lora_model

    if not (getattr(peft_cfg, "prompt_tuning_init", None) == "TEXT" and cfg.model == BUILTIN_MODEL):
        return get_lora_model(base, peft_cfg)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        peft_cfg.tokenizer_name_or_path = folder
        model = get_lora_model(base, peft_cfg)
    model.peft_config["default"].tokenizer_name_or_path = cfg.model
    return model


def _follow_schedule(scheduler) -> None:
    """After a resume, set the learning rate of the next step from this run's schedule.

    The optimizer state holds the lr the checkpointed run's schedule set; a run extended on resume
    (--max-steps upward) has a longer schedule (e.g. the linear decay had reached 0 at the old end).
    transformers' schedules are LambdaLR: lr = base_lr * lambda(step). With an unchanged length this
    recomputes the very same value, so an ordinary resume stays bit-for-bit."""
    inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate wraps it
    if not hasattr(inner, "lr_lambdas"):
        return
    lrs = [base * fn(inner.last_epoch) for base, fn in zip(inner.base_lrs, inner.lr_lambdas)]
    for group, lr in zip(inner.optimizer.param_groups, lrs):
        group["lr"] = lr
    inner._last_lr = lrs


def _grad_norm(accelerator, model, trainable, max_norm: float, exact: bool) -> float | None:
    """The total gradient norm (clipped to max_norm when > 0; under fp16 only when clipping, since
    the gradients are still scaled otherwise). Same on every process: gradients are all-reduced."""
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    if not exact:
        return None
    grads = [p.grad for p in trainable if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _all_finite(params: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite. One fused norm per tensor first (a NaN or
    inf makes its norm non-finite; measured 0.07 ms against 0.5 ms for per-tensor isfinite on the
    demo's 28 LoRA tensors, a 40 ms step); a norm can also overflow for huge finite weights, so a
    non-finite one is confirmed element-wise."""
    if not params:
        return True
    if bool(torch.isfinite(torch.stack(torch._foreach_norm(params))).all()):
        return True
    return all(bool(torch.isfinite(p).all()) for p in params)


def _write_outputs(cfg, lora, tokenizer, out: Path, log: list[dict], step: int, last_ckpt: Path | None,
                   replacing: outputs.Replacement) -> TrainFailed | None:
    """adapter/ (+ tokenizer), loss.png, merged/; each folder built aside and swapped in whole.
    Returns (not raises: the other processes must hear of it) a TrainFailed saying where this run's
    weights are when a write fails."""
    adapter = out / "adapter"
    try:
        outputs.write_folder(adapter, lambda d: (lora.save_pretrained(d), tokenizer.save_pretrained(d)))
    except OSError as e:
        why = f"could not write {adapter} ({e.strerror or e})"
        if last_ckpt is not None and last_ckpt.name == f"{ckpt.PREFIX}{step}":
            return TrainFailed(f"{why}; this run's final weights are in {last_ckpt} (rerun with "
                               f"--resume-from-checkpoint latest to write the adapter again)", last_ckpt)
        try:
            kept = outputs.emergency_dir(out, step)
            lora.save_pretrained(kept)
            tokenizer.save_pretrained(kept)
        except OSError as e2:
            return TrainFailed(f"{why}; keeping the weights elsewhere failed too ({e2.strerror or e2}): they "
                               f"are lost" + (f"; the last checkpoint is {last_ckpt}" if last_ckpt else ""),
                               last_ckpt)
        return TrainFailed(f"{why}; this run's final weights (step {step}) are kept as a PEFT adapter in "
                           f"{kept}", kept)
    replacing.commit()  # the adapter of this run is complete
    try:
        plot_losses(log, out / "loss.png")
        if cfg.merge:
            _save_merged(cfg, adapter, tokenizer, out / "merged", lora.config)
    except OSError as e:
        return TrainFailed(f"wrote {adapter}, but could not write {e.filename or 'the outputs'} "
                           f"({e.strerror or e}); the adapter is complete", adapter)
    return None


def _raise_if_any(accelerator, failure: TrainFailed | None) -> None:
    flag = torch.tensor(0 if failure is None else 1, device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item():
        raise failure or TrainFailed("the main process could not write the outputs (its error says why)")


def _check_fits(n: int, global_batch: int, cfg: TrainConfig, world: int, what: str) -> None:
    if n < global_batch:
        raise TrainError(
            f"the train split has {n} {what} but one optimizer step needs {global_batch} "
            f"(--per-device-train-batch-size {cfg.per_device_train_batch_size} x {world} process(es) x "
            f"--gradient-accumulation-steps {cfg.gradient_accumulation_steps}); lower them or add data")


def _tag_score(accelerator, model, tokenizer, prompts, refs, cfg, seq2seq) -> float | None:
    """Exact match of greedy completions on the first eval prompts (main process; others wait, or
    under FSDP generate the same completions with it: each forward gathers shards from all)."""
    if not prompts:
        return None
    score = torch.zeros((), device=accelerator.device)
    sharded = fsdp.is_sharded(accelerator)
    if accelerator.is_main_process or sharded:
        gen = generate_completions(_bare(accelerator, model), tokenizer, prompts,
                                   cfg.max_new_tokens, seq2seq, synced_gpus=sharded)
        if accelerator.is_main_process:
            score += exact_match(gen, refs)
    return accelerator.reduce(score, reduction="sum").item()  # share the main process's number


def _save_merged(cfg: TrainConfig, adapter_dir: Path, tokenizer, merged_dir: Path, trained_config) -> None:
    """Reload the base unquantized, apply the saved adapter, merge, save model + tokenizer.

    As the QLoRA recipe does: merging into a 4-bit / int8 base would re-quantize the sum and lose
    the update's precision, so the merged model is full precision whatever --quantization was.
    trained_config: the trained model's HF config (a classifier's classes and pad id carry over).
    """
    from lora_core import LoraModel

    classify = cfg.task == "seq-cls"
    base = load_base_model(cfg.model, "none", cfg.seed, num_labels=trained_config.num_labels if classify else None)
    if classify:
        for key in ("pad_token_id", "id2label", "label2id"):
            setattr(base.config, key, getattr(trained_config, key))
    merged = LoraModel.from_pretrained(base, adapter_dir).merge_and_unload()
    outputs.write_folder(merged_dir, lambda d: (merged.save_pretrained(d), tokenizer.save_pretrained(d)))


def _write_log(path: Path, log: list[dict]) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text("".join(json.dumps(r) + "\n" for r in log))
    tmp.replace(path)


def _tensorboard_installed() -> bool:
    try:
        import tensorboard  # noqa: F401
        return True
    except ImportError:
        return False


def _print_summary(before: dict, after: dict, samples: list[dict], out: Path, secs: float, steps: int,
                   merged_dir: Path | None):
    def fmt(v, pct=False):
        if v is None:
            return "n/a"
        return f"{100 * v:.1f}%" if pct else f"{v:.4f}"

    print(f"\ntrained {steps} steps in {secs:.1f}s")
    print(f"{'':18s}{'before':>12s}{'after':>12s}")
    print(f"{'eval loss':18s}{fmt(before['eval_loss']):>12s}{fmt(after['eval_loss']):>12s}")
    if "accuracy" in after:  # --task seq-cls
        print(f"{'accuracy':18s}{fmt(before.get('accuracy'), True):>12s}{fmt(after['accuracy'], True):>12s}")
    else:
        print(f"{'perplexity':18s}{fmt(before['perplexity']):>12s}{fmt(after['perplexity']):>12s}")
        print(f"{'tag exact match':18s}{fmt(before.get('tag_exact_match'), True):>12s}"
              f"{fmt(after.get('tag_exact_match'), True):>12s}")
    for s in samples:
        print(f"\nprompt:    {s['prompt']!r}\ngenerated: {s['generated']!r}\nreference: {s['reference']!r}")
    print(f"\nwrote {out}/log.jsonl, {out}/loss.png, {out}/adapter/" + (f", {merged_dir}/" if merged_dir else ""))
    if merged_dir is None and (out / "merged").exists():
        print(f"note: {out}/merged/ is from an earlier stage of this run, not from this one (pass --merge to "
              f"rewrite it)")
