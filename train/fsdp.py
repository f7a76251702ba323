"""Sharded training with FSDP2 through Accelerate: the checks, the plugin, and the gathers.

`python -m train --fsdp` (or an Accelerate config file with `distributed_type: FSDP`) shards the
model with FSDP2's `fully_shard`, one unit per decoder layer (the model's `_no_split_modules`),
plus Accelerate's units for the embedding and the final norm + head, and the root. Each process
keeps 1/world of every parameter; a unit's full weights are all-gathered just before its forward
(and again before its backward) and freed after. Only the LoRA parameters have gradients, so only
they are reduce-scattered and stepped, each process updating its shard.

Facts this rests on (torch 2.13, accelerate 1.15, bitsandbytes 0.50.2, checked on CPU with gloo):
- Inside a unit's forward, `layer.weight` is a plain Parameter over the gathered storage; between
  forwards it is the sharded DTensor. FSDP keeps the same unsharded Parameter object and frees /
  re-allocates its storage in place, so the LoRA layer's cached weight record (a view of that
  storage) reads the re-gathered bytes in backward; `lora_core.quant` refuses a DTensor weight.
- A bitsandbytes 4-bit weight loses its `Params4bit` class and `quant_state` attribute when FSDP
  turns it into a DTensor; `Linear4bit.quant_state` (set when it was quantized) still holds the
  QuantState, and `lora_core.quant` reads it from there. absmax / code stay whole on every process.
- Accelerate leaves a uint8-stored 4-bit weight out of sharding (`ignored_params`: every process
  keeps the whole packed model), so 4-bit bases need `--bnb-4bit-quant-storage` set to a float
  dtype (the same bytes viewed as bf16 words).
- FSDP's mixed precision casts every floating parameter to `param_dtype` when it gathers it: a
  packed weight stored as float32 or float16 would be converted numerically under bf16 mixed
  precision (garbage bytes), so the storage dtype must then equal the mixed-precision dtype.
- Accelerate's FSDP2 path does not wrap the forward in autocast; mixed precision is FSDP's
  MixedPrecisionPolicy (params gathered in bf16). We reduce the LoRA gradients in fp32 (they are
  small) where Accelerate's default would reduce them in bf16.
- Accelerate's own activation checkpointing for FSDP wraps layers with
  `checkpoint_wrapper(preserve_rng_state=False)`: the recompute would draw other LoRA dropout
  seeds than the forward did. `--gradient-checkpointing` (transformers' checkpointing, which
  restores the RNG state) works under FSDP2 unchanged, so that is the one we use.
- Accelerate 1.15 selects FSDP only on accelerators (a CPU gloo run stays MULTI_CPU and the plugin
  is dropped); `enable_on_cpu` does for that case what AcceleratorState does on GPUs, so the CPU
  test exercises Accelerate's FSDP2 code (fsdp2_prepare_model, clip_grad_norm_, no_sync).
- Accelerate's `save_state` under FSDP writes the whole model; checkpoints here hold only what a
  resume needs, gathered to full tensors, in the same files and formats as an unsharded run.
- A base quantized on the CPU reaches the GPU through FSDP: it moves each parameter with
  `param.data = param.to(device)` before sharding, and `Params4bit.to` moves the QuantState with
  it (read, not run: no GPU here).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from .config import TrainConfig
from .errors import TrainError

# Plugin fields we set, each with the environment variable an Accelerate config file sets for it
# (`accelerate launch --config_file ...`): a value from the config file wins over ours.
_PLUGIN_DEFAULTS = {
    "fsdp_version": ("FSDP_VERSION", 2),
    "auto_wrap_policy": ("FSDP_AUTO_WRAP_POLICY", "transformer_based_wrap"),  # _no_split_modules
    "reshard_after_forward": ("FSDP_RESHARD_AFTER_FORWARD", True),  # free gathered weights after use
    "state_dict_type": ("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT"),  # unused: we gather ourselves
    "cpu_ram_efficient_loading": ("FSDP_CPU_RAM_EFFICIENT_LOADING", False),
    "activation_checkpointing": ("FSDP_ACTIVATION_CHECKPOINTING", False),
    "cpu_offload": ("FSDP_OFFLOAD_PARAMS", False),
}
LAUNCH_HINT = ("launch several processes: torchrun --nproc_per_node N -m train --fsdp ... or "
               "accelerate launch --num_processes N -m train --fsdp ...")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def wanted(cfg: TrainConfig) -> bool:
    """--fsdp, or an Accelerate config file that enables FSDP (accelerate launch exports it)."""
    return cfg.fsdp or _env_true("ACCELERATE_USE_FSDP")


def check(cfg: TrainConfig) -> None:
    """Refuse combinations that cannot work, before anything is loaded (raises TrainError)."""
    four_bit = cfg.quantization in ("nf4", "fp4")
    if cfg.bnb_4bit_quant_storage != "uint8" and not four_bit:
        raise TrainError(f"--bnb-4bit-quant-storage {cfg.bnb_4bit_quant_storage} applies to 4-bit bases "
                         f"only (--quantization nf4 or fp4), not --quantization {cfg.quantization}")
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        # Tried (DeepSpeed 0.19.8, CPU, gloo): ZeRO-3 steps run through Accelerate, but on CPU
        # Accelerate counts 1 process with every rank "main", and on any device ZeRO-3 leaves each
        # parameter an empty placeholder outside its gathered context, which this loop's adapter
        # save, checkpoints and weight checks would read.
        raise TrainError("DeepSpeed (an Accelerate config with distributed_type: DEEPSPEED) is not supported "
                         "by python -m train; shard with FSDP2 instead: --fsdp, or distributed_type: FSDP "
                         "with fsdp_version: 2 in the config")
    if not wanted(cfg):
        return
    source = "--fsdp" if cfg.fsdp else "the Accelerate config (ACCELERATE_USE_FSDP)"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise TrainError(f"{source} shards the model over processes, but this is 1 process; {LAUNCH_HINT}")
    if cfg.method != "lora":
        raise TrainError(f"--fsdp with --method {cfg.method}: sharding is built and tested for --method lora "
                         f"only (adalora's rank allocation reads whole gradients, each process holds shards; "
                         f"the other methods were not run sharded); use --method lora or no --fsdp")
    if cfg.task != "lm":
        raise TrainError(f"--fsdp with --task {cfg.task}: sharding is built and tested for language models only "
                         f"(a classifier's head, trained in full as a module to save, was not run sharded); "
                         f"drop --fsdp")
    if cfg.quantization == "int8":
        raise TrainError("--fsdp cannot shard an int8 base: bitsandbytes keeps its int8 scales (SCB) on the "
                         "parameter and in layer state that FSDP's sharded parameters drop; use "
                         "--quantization nf4 --bnb-4bit-quant-storage bfloat16 (QLoRA) or none")
    if four_bit and cfg.bnb_4bit_quant_storage == "uint8":
        raise TrainError(f"--fsdp with --quantization {cfg.quantization} needs --bnb-4bit-quant-storage "
                         f"bfloat16: Accelerate leaves uint8-stored 4-bit weights unsharded, so every "
                         f"process would hold the whole packed model")
    mp_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.mixed_precision)
    if four_bit and mp_dtype and cfg.bnb_4bit_quant_storage != mp_dtype:
        raise TrainError(f"--fsdp with --mixed-precision {cfg.mixed_precision} casts every float parameter "
                         f"to {mp_dtype} when it gathers it, which would convert the packed 4-bit bytes "
                         f"stored as {cfg.bnb_4bit_quant_storage}; use --bnb-4bit-quant-storage {mp_dtype}")
    # What an Accelerate config file asks for (accelerate launch exports it; the plugin reads it).
    version = os.environ.get("FSDP_VERSION", "2")
    if version != "2":
        raise TrainError(f"the Accelerate config asks for FSDP version {version}; lorafuse shards with FSDP2: "
                         f"set fsdp_version: 2 in it")
    if _env_true("FSDP_ACTIVATION_CHECKPOINTING"):
        raise TrainError("fsdp_activation_checkpointing (Accelerate's checkpoint wrapper) recomputes without "
                         "restoring the RNG state, so LoRA dropout would differ between forward and "
                         "recompute; set it to false and pass --gradient-checkpointing")
    if _env_true("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise TrainError("fsdp_cpu_ram_efficient_loading is not supported: every process loads the base and "
                         "builds its LoRA layers before sharding; set it to false")
    if _env_true("FSDP_OFFLOAD_PARAMS"):
        if not torch.cuda.is_available():
            raise TrainError("fsdp_offload_params moves parameters from a GPU to host memory; on a CPU-only "
                             "run they are there already (and FSDP's offload pins memory, which needs CUDA); "
                             "set it to false")
        if four_bit:
            raise TrainError("fsdp_offload_params with a 4-bit base is not supported: the packed weights "
                             "would move to host memory but their QuantState (absmax) stays on the GPU; "
                             "set it to false")


def build_plugin(cfg: TrainConfig):
    """Accelerate's FullyShardedDataParallelPlugin for this run, or None without FSDP."""
    if not wanted(cfg):
        return None
    from accelerate import FullyShardedDataParallelPlugin

    kwargs = {name: (None if env in os.environ else ours) for name, (env, ours) in _PLUGIN_DEFAULTS.items()}
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    if dt is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        kwargs["mixed_precision_policy"] = MixedPrecisionPolicy(param_dtype=dt, reduce_dtype=torch.float32)
    return FullyShardedDataParallelPlugin(**kwargs)


def enable_on_cpu(accelerator, plugin) -> None:
    """Turn FSDP on for a CPU (gloo) run, as AcceleratorState does on accelerators; else no-op.

    Accelerate 1.15 assigns DistributedType.FSDP only to accelerator backends, so with cpu=True
    the plugin is dropped and the run would fall back to plain data parallelism.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if plugin is None or state.distributed_type == DistributedType.FSDP:
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise TrainError(f"FSDP was asked for, but Accelerate set up {state.distributed_type}; "
                         f"launch with torchrun or accelerate launch on >= 2 processes")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)  # keeps a policy already given
    state.fsdp_plugin = plugin
    # Both singletons, as AcceleratorState does: a later AcceleratorState() copies PartialState's.
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP


def is_sharded(accelerator) -> bool:
    """Whether `accelerator` trains with FSDP (set up by --fsdp or an Accelerate config file)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def describe(model: torch.nn.Module, world: int) -> str:
    """One line: how much of the model is sharded and what this process holds (bytes of storage)."""
    from torch.distributed.tensor import DTensor

    sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
    held = sum(p.to_local().untyped_storage().nbytes() if isinstance(p, DTensor) else p.untyped_storage().nbytes()
               for p in model.parameters())
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    return (f"FSDP2: {len(sharded)} of {len(list(model.parameters()))} parameters sharded over {world} "
            f"processes; this process holds {held / 2**20:.2f} MiB of the model's {whole / 2**20:.2f} MiB")


def all_finite(accelerator, params: list[torch.Tensor], check) -> bool:
    """`check(tensors)` over this process's shards of `params`, agreed by all processes (a
    collective): a NaN in one shard stops every process at the same step."""
    from torch.distributed.tensor import DTensor

    ok = check([p.to_local() if isinstance(p, DTensor) else p for p in params])
    flag = torch.tensor(0 if ok else 1, device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


@contextlib.contextmanager
def whole_trainable(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block every trainable parameter of `model` is its whole tensor, so code that
    reads the weights (save_pretrained) needs no collectives; the shards come back on exit.

    Every process must enter it (the gather is a collective). No forward may run inside: FSDP's
    hooks would look for the sharded parameters it manages.
    """
    from torch.distributed.tensor import DTensor

    swapped = []  # (module, name, sharded parameter)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and isinstance(p, DTensor):
                swapped.append((module, name, p))
                module._parameters[name] = torch.nn.Parameter(p.detach().full_tensor(), requires_grad=True)
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


# ---- gathers: every process calls these, in the same order -----------------------------------------
def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor shard is all-gathered (a collective), a plain tensor returned as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into `param`; a sharded (DTensor) parameter takes its own shard of it.

    No communication: every process holds `full` (read from the checkpoint).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            full = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                                     src_data_rank=None)
        param.copy_(full)


def full_optimizer_state(optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded state tensor (AdamW's exp_avg, exp_avg_sq)
    gathered to a whole CPU tensor: the format an unsharded run saves."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: full_tensor(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                   for i, s in sd["state"].items()}
    return sd


def load_full_optimizer_state(optimizer, sd: dict) -> None:
    """Load a state dict saved by `full_optimizer_state` (or by an unsharded run): each process
    keeps the shard of every state tensor that matches its shard of the parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]  # state keys index these
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                    for k, v in s.items()}
    optimizer.load_state_dict({**sd, "state": state})


def save_rest(accelerator, output_dir) -> None:
    """What Accelerate's save_state writes besides the model and optimizer: schedulers, samplers,
    the GradScaler and every process's RNG states (random_states_<rank>.pkl)."""
    from accelerate.checkpointing import save_accelerator_state

    save_accelerator_state(str(output_dir), [], [], accelerator._schedulers, accelerator._dataloaders,
                           accelerator.state.process_index, accelerator.step, accelerator.scaler,
                           save_on_each_node=accelerator.project_configuration.save_on_each_node)


def load_rest(accelerator, input_dir) -> None:
    """The counterpart of `save_rest` (Accelerate's load_state without the model and optimizer)."""
    from accelerate.checkpointing import load_accelerator_state

    override = load_accelerator_state(str(input_dir), [], [], accelerator._schedulers,
                                      accelerator._dataloaders, accelerator.state.process_index,
                                      accelerator.scaler)
    for name, value in override.items():  # e.g. the accelerator's step counter
        setattr(accelerator, name, value)
