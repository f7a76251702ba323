"""Checkpoints: atomic `accelerator.save_state` directories holding only what a resume needs.

Layout of `<output-dir>/checkpoint-<step>/`: Accelerate's optimizer.bin, scheduler.bin,
random_states_<rank>.pkl (python/numpy/torch RNG of every process), plus ours:
adapter_state.safetensors (the trainable parameters only; the frozen base is rebuilt from --model)
and trainer_state.json (step, epoch, log history, the before-training eval, the run's config and
number of processes). A resume checks all of it first (`check_checkpoint`): a damaged or partial
checkpoint, or settings that define the training differently, stop the run before it starts.

Under FSDP the same files hold the same formats: the sharded LoRA weights and optimizer state
are gathered to whole tensors first (`train.fsdp`) rather than written per process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import fsdp, outputs
from .config import TrainConfig, resume_mismatches
from .errors import TrainError

PREFIX = "checkpoint-"
STATE = "trainer_state.json"
ADAPTER_STATE = "adapter_state.safetensors"
OPTIMIZER_STATE = "optimizer.bin"  # Accelerate's name (accelerate.utils.OPTIMIZER_NAME + ".bin")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (a trainer_state.json inside), oldest step first."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = re.fullmatch(PREFIX + r"(\d+)", p.name)
        if m and (p / STATE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_resume(spec: str, output_dir: Path) -> Path | None:
    """'' -> None; 'latest' -> newest checkpoint in output_dir; else the given directory."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise TrainError(f"--resume-from-checkpoint latest: no checkpoint-* directory in {output_dir}; "
                             f"run without it to start fresh, or pass a checkpoint path")
        return found[-1]
    path = Path(spec)
    if not (path / STATE).is_file():
        raise TrainError(f"--resume-from-checkpoint {spec}: not a checkpoint directory (no {STATE}); "
                         f"pass latest or a checkpoint-<step> directory")
    return path


def register_hooks(accelerator) -> None:
    """Make save_state/load_state store only trainable parameters (the LoRA weights).

    Accelerate would otherwise write the whole model, frozen (maybe quantized) base included, to
    every checkpoint. The hooks take the model out of Accelerate's lists and handle it themselves.
    """

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            _save_trainable(accelerator, model, Path(output_dir) / _name(i))
        weights.clear()  # nothing left for Accelerate to save as model weights

    def load_hook(models, input_dir):
        for i, model in enumerate(models):
            _load_trainable(accelerator, model, Path(input_dir) / _name(i))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _name(i: int) -> str:
    return ADAPTER_STATE if i == 0 else ADAPTER_STATE.replace(".safetensors", f"_{i}.safetensors")


def _save_trainable(accelerator, model, path: Path) -> None:
    """Every process calls this (under FSDP the gather is a collective); the main one writes."""
    trainable = {n: fsdp.full_tensor(p.detach()).cpu().contiguous()
                 for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    if accelerator.is_main_process:
        save_file(trainable, str(path), metadata={"format": "pt"})
        os.chmod(path, 0o644)  # safetensors creates 0600; match the files Accelerate writes


def _load_trainable(accelerator, model, path: Path) -> None:
    state = load_file(str(path))
    params = dict(accelerator.unwrap_model(model).named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unexpected = [n for n in state if n not in params]
    if missing or unexpected:
        raise TrainError(f"checkpoint {path.parent} does not fit this model ({len(missing)} trainable "
                         f"parameter(s) missing from it, e.g. {missing[:2]}; {len(unexpected)} "
                         f"unknown to this model, e.g. {unexpected[:2]}); resume with the same "
                         f"--model and LoRA flags")
    for n, t in state.items():
        fsdp.copy_full_into(params[n], t)  # a sharded parameter takes its own shard


def _save_state(accelerator, output_dir: Path) -> None:
    if not fsdp.is_sharded(accelerator):
        accelerator.save_state(str(output_dir))
        return
    # Accelerate's save_state would also write the whole sharded base model: write the same files
    # as above instead, from gathered tensors.
    output_dir.mkdir(parents=True, exist_ok=True)
    _save_trainable(accelerator, accelerator._models[0], output_dir / ADAPTER_STATE)
    optimizer_state = fsdp.full_optimizer_state(accelerator._optimizers[0])
    if accelerator.is_main_process:
        torch.save(optimizer_state, output_dir / OPTIMIZER_STATE)
    fsdp.save_rest(accelerator, output_dir)


def _load_state(accelerator, input_dir: Path) -> None:
    if not fsdp.is_sharded(accelerator):
        accelerator.load_state(str(input_dir))
        return
    _load_trainable(accelerator, accelerator._models[0], input_dir / ADAPTER_STATE)
    optimizer_state = torch.load(input_dir / OPTIMIZER_STATE, map_location="cpu", weights_only=True)
    fsdp.load_full_optimizer_state(accelerator._optimizers[0], optimizer_state)
    fsdp.load_rest(accelerator, input_dir)


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict, limit: int) -> Path:
    """Write checkpoint-<step> atomically, then keep only the newest `limit` (<= 0: all).

    Every process calls this (each saves its own RNG state). The directory is written under a
    temporary name and renamed only when complete, so an interrupt never leaves a half checkpoint
    under a real name and never touches the previous one.
    """
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".tmp-{PREFIX}{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # leftover of an interrupted save
    accelerator.wait_for_everyone()
    _save_state(accelerator, tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE).write_text(json.dumps(state))
        outputs.replace_dir(tmp, final)  # final exists when a resume re-writes a step
        ckpts = list_checkpoints(output_dir)
        # Checkpoints after this step belong to the branch this run left (a resume from an older
        # checkpoint, allowed with --overwrite-output-dir): they would shadow it for `latest`.
        for p in ckpts:
            if int(p.name[len(PREFIX):]) > step:
                shutil.rmtree(p)
        ckpts = [p for p in ckpts if int(p.name[len(PREFIX):]) <= step]
        if limit > 0:
            for p in ckpts[:-limit]:
                shutil.rmtree(p)
    accelerator.wait_for_everyone()
    return final


def check_checkpoint(path: Path, cfg: TrainConfig, world: int) -> dict:
    """Check a checkpoint before anything is loaded or written; return its trainer_state.

    TrainError (one line) when a file is missing or unreadable (a truncated optimizer.bin, bad
    JSON, a missing RNG state), when its weights are non-finite, or when `cfg` defines the training
    differently from the run that wrote it (listed as `field: old -> new`).
    """
    from accelerate.utils import load  # Accelerate's own loader: what load_state will call

    def damaged(what: str) -> TrainError:
        return TrainError(f"checkpoint {path} is damaged or incomplete: {what}; resume from another "
                          f"checkpoint-* (or --resume-from-checkpoint with its path), or start a new run")

    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(f"{STATE} cannot be read ({e})") from None
    need = {"step": int, "log": list, "before": dict, "config": dict}
    bad = [k for k, t in need.items() if not isinstance(state.get(k) if isinstance(state, dict) else None, t)]
    if bad:
        raise damaged(f"{STATE} lacks {', '.join(bad)}")
    stored_world = state.get("world_size", len(list(path.glob("random_states_*.pkl"))))
    if stored_world != world:
        raise TrainError(f"checkpoint {path} was written by {stored_world} process(es), this run has "
                         f"{world}; the global batch and data order would change: resume with "
                         f"{stored_world} process(es)")
    diffs = resume_mismatches(state["config"], cfg)
    if diffs:
        raise TrainError(f"--resume-from-checkpoint {path}: these settings differ from the checkpoint's "
                         f"run: {'; '.join(diffs)}; resume with its values, or start a new run in another "
                         f"--output-dir (a resume may change only the run's length, the logging, eval and checkpoint "
                         f"cadence, eval/generation sizes, outputs and speed flags: train.config.RESUME_MAY_CHANGE)")
    if 0 < cfg.max_steps < state["step"]:
        raise TrainError(f"--max-steps {cfg.max_steps} ends before the checkpoint's step {state['step']}; "
                         f"pass --max-steps >= {state['step']}")
    files = [ADAPTER_STATE, OPTIMIZER_STATE, "scheduler.bin"] + [f"random_states_{i}.pkl" for i in range(world)]
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise damaged(f"{', '.join(missing)} missing")
    try:
        weights = load_file(str(path / ADAPTER_STATE))
    except Exception as e:
        raise damaged(f"{ADAPTER_STATE} cannot be read ({_first_line(e)})") from None
    nonfinite = [n for n, t in weights.items() if not torch.isfinite(t).all()]
    if nonfinite:
        raise damaged(f"{ADAPTER_STATE} holds non-finite values in {nonfinite[0]}")
    for f in files[1:]:
        try:
            load(path / f, map_location="cpu")
        except Exception as e:
            raise damaged(f"{f} cannot be read ({_first_line(e)})") from None
    return state


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model (trainable part), optimizer, scheduler and RNG states; return trainer_state."""
    _load_state(accelerator, path)
    return json.loads((path / STATE).read_text())
