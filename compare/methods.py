"""`python -m compare equivalence --method ia3|adalora|adaption-prompt|prompt-tuning`: the other PEFT
methods against peft, row by row, on the same base (the LoRA rows are compare/equivalence.py's).

Both sides are built from the same seed (the methods draw their initial weights in the same order:
the first row checks it), then every trainable tensor gets the same seeded perturbation, so IA3
scales, AdaLoRA's singular values and adaption-prompt gates are not at their neutral init. The
trainable tensors are matched by position (each stack registers them in module order) and
checked shape by shape. Rows: counts, forward (train and inference mode), every gradient, an
AdamW trajectory (AdaLoRA: with update_and_allocate each step, over a schedule that prunes, and
the final rank pattern), the adapter files both ways, and merged outputs where the method merges
(IA3).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from . import models
from .equivalence import (Report, _adamw_losses, _row, _trajectory_row, check_counts, check_grads, logits_of, no_dropout,
                          tolerances)
from .models import CompareError, ModelSpec, Pair, example_batch, load_base
from .report import Row, diff

METHODS = ("ia3", "adalora", "adaption-prompt", "prompt-tuning")  # the CLI's names ("lora": equivalence.py)
PERTURB = 0.1  # size of the seeded change given to every trainable tensor on both sides


def method_configs(method: str, spec: ModelSpec, base, steps: int):
    """(our config, peft's config) for `method`, sized from the spec: r is AdaLoRA's init_r, the
    prompt length (adapter_len / num_virtual_tokens)."""
    import peft

    import lora_core

    task = "SEQ_2_SEQ_LM" if getattr(base.config, "is_encoder_decoder", False) else "CAUSAL_LM"
    if method == "ia3":
        kw = dict(target_modules=spec.target_modules)
        classes = (lora_core.IA3Config, peft.IA3Config)
    elif method == "adalora":
        if steps < 2:
            raise CompareError("--method adalora needs --steps >= 2 (a budgeting phase, then the final mask)")
        kw = dict(init_r=spec.r, target_r=max(1, spec.r // 2), lora_alpha=spec.lora_alpha, total_step=steps,
                  tinit=0, tfinal=1, target_modules=spec.target_modules)
        classes = (lora_core.AdaLoraConfig, peft.AdaLoraConfig)
    elif method == "adaption-prompt":
        layers = getattr(base.config, "num_hidden_layers", None) or getattr(base.config, "n_layer", 1)
        kw = dict(adapter_len=spec.r, adapter_layers=layers)
        classes = (lora_core.AdaptionPromptConfig, peft.AdaptionPromptConfig)
    elif method == "prompt-tuning":
        kw = dict(num_virtual_tokens=spec.r)
        classes = (lora_core.PromptTuningConfig, peft.PromptTuningConfig)
    else:
        raise CompareError(f"unknown method {method!r}; valid: lora, {', '.join(METHODS)}")
    return classes[0](task_type=task, **kw), classes[1](task_type=task, **kw)


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_method_pair(spec: ModelSpec, method: str, steps: int, state: Optional[list] = None) -> Pair:
    """Both sides from the same seed; then the same perturbation (or the given tensors) on both."""
    import peft

    import lora_core

    base_ours, base_peft = load_base(spec), load_base(spec)
    ours_cfg, peft_cfg = method_configs(method, spec, base_ours, steps)
    try:
        torch.manual_seed(spec.seed)
        ours = lora_core.get_lora_model(base_ours, ours_cfg)
        ours.set_backend(spec.backend)
    except ValueError as e:
        raise CompareError(f"lora_core refused this configuration: {e}") from None
    try:
        torch.manual_seed(spec.seed)
        theirs = peft.get_peft_model(base_peft, peft_cfg)
    except ValueError as e:
        raise CompareError(f"peft refused this configuration: {e}") from None
    mine, ref = trainable(ours), trainable(theirs)
    if [tuple(p.shape) for _, p in mine] != [tuple(p.shape) for _, p in ref]:
        raise CompareError(f"ours and peft train different tensors: {[(n, tuple(p.shape)) for n, p in mine][:4]} "
                           f"vs {[(n, tuple(p.shape)) for n, p in ref][:4]}")
    pair = Pair(ours, theirs, keymap={n: (p, q) for (n, p), (_, q) in zip(mine, ref)})
    pair.same_init = all(torch.equal(p, q) for p, q in pair.keymap.values())
    g = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for i, (p, q) in enumerate(pair.keymap.values()):
            value = state[i] if state is not None else q.float() + PERTURB * torch.randn(q.shape, generator=g)
            p.copy_(value.to(p.dtype)), q.copy_(value.to(q.dtype))
    no_dropout(ours), no_dropout(theirs)
    return pair


def check_init(pair: Pair) -> Row:
    return Row("same seed -> same initial tensors", 0.0 if pair.same_init else 1.0, 0.0 if pair.same_init else 1.0,
               0.0, ok=pair.same_init, reason="the same seed must draw the same initial tensors in the same "
                                              "order (before the perturbation): exact",
               where="every trainable tensor equal" if pair.same_init else "the draws differ")


def check_trajectory(pair: Pair, batches: list[dict], tol, allocate: bool, lr: float = 1e-3) -> list[Row]:
    """AdamW steps on both sides (AdaLoRA: update_and_allocate(step) after each, as the train loop
    does); the loss at every step, and for AdaLoRA the final rank pattern."""
    losses = {}
    for side, model in (("ours", pair.ours), ("peft", pair.peft)):
        allocator = model if side == "ours" else model.base_model  # peft's update_and_allocate is its tuner's
        losses[side] = _adamw_losses(model, batches, lr, params=[p for _, p in trainable(model)],
                                     after_step=allocator.update_and_allocate if allocate else None)
    rows = [_trajectory_row(f"training trajectory ({len(batches)} AdamW steps"
                            f"{', rank allocation' if allocate else ''}, loss)", losses, tol, {"lr": lr})]
    if allocate:
        mine = pair.ours.peft_config["default"].rank_pattern or {}
        ref = {k.replace(".default", ""): v for k, v in (pair.peft.peft_config["default"].rank_pattern or {}).items()}
        wrong = sorted(k for k in set(mine) | set(ref) if mine.get(k) != ref.get(k))
        kept = {k: sum(v) for k, v in mine.items()}
        rows.append(Row(f"final rank pattern ({len(ref)} layers)", float(len(wrong)), float(len(wrong)), 0.0,
                        ok=not wrong and bool(ref), reason="integer counts: exact",
                        where=(f"differs at {wrong[0]}" if wrong else f"kept ranks {sorted(kept.values())}"),
                        detail={"kept": kept}))
    return rows


def check_files(pair: Pair, spec: ModelSpec, batch: dict, tol, tmp: Path) -> list[Row]:
    """Each side's save_pretrained loaded by the other; tensors must come back bit for bit."""
    import peft
    from safetensors.torch import load_file

    import lora_core

    ours_dir, peft_dir = tmp / "ours", tmp / "peft"
    pair.ours.save_pretrained(str(ours_dir))
    pair.peft.save_pretrained(str(peft_dir))
    mine = load_file(str(ours_dir / "adapter_model.safetensors"))
    ref = load_file(str(peft_dir / "adapter_model.safetensors"))
    same_keys = set(mine) == set(ref)
    t_diff = max((float("inf") if mine[k].shape != ref[k].shape else
                  (mine[k].float() - ref[k].float()).abs().max().item() if ref[k].numel() else 0.0
                  for k in ref if k in mine), default=0.0)  # AdaLoRA may prune a layer to rank 0
    fields = set(json.loads((ours_dir / "adapter_config.json").read_text())) == \
        set(json.loads((peft_dir / "adapter_config.json").read_text()))
    rows = []
    for name, loaded, writer in (
            ("our adapter file -> peft", peft.PeftModel.from_pretrained(load_base(spec), str(ours_dir)), pair.ours),
            ("peft adapter file -> ours", lora_core.LoraModel.from_pretrained(load_base(spec), str(peft_dir)),
             pair.peft)):
        if isinstance(loaded, lora_core.LoraModel):
            loaded.set_backend(spec.backend)
        no_dropout(loaded)
        batch_no_labels = {k: v for k, v in batch.items() if k != "labels"}  # peft's AdaLoRA needs no loss here
        if getattr(loaded.config, "is_encoder_decoder", False):
            batch_no_labels["decoder_input_ids"] = batch["labels"]
        a, r = diff(logits_of(loaded, batch_no_labels, "exact"), logits_of(writer, batch_no_labels, "exact"))
        row = _row(name, a, r, tol, where=("keys, fields and tensors identical" if same_keys and fields and t_diff == 0
                                           else f"files differ: keys {same_keys}, fields {fields}, tensors {t_diff:.3g}"))
        row.ok = row.ok and same_keys and fields and t_diff == 0
        rows.append(row)
    return rows


def check_merge(pair: Pair, batch: dict, tol) -> Row:
    pair.ours.merge_adapter()
    pair.peft.merge_adapter()
    return _row("merged outputs", *diff(logits_of(pair.ours, batch, "exact"), logits_of(pair.peft, batch, "exact")),
                tol)


def run_method_equivalence(spec: ModelSpec, method: str, steps: int = 4,
                           progress: Optional[Callable[[str], None]] = None,
                           tamper: Optional[Callable[[Pair], None]] = None) -> Report:
    """Every check of `method` against peft; the report's rows in the order they print. tamper:
    called on each pair after it is built (tests break one tensor of ours and see rows fail)."""
    spec.validate()
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    tols = tolerances(spec, "cuda" if torch.cuda.is_available() else "cpu")
    report = Report(spec)
    report.info.update(method=method, model=spec.model if spec.model != "tiny" else
                       f"tiny ({models.tiny_checkpoint()[1]})")

    say(f"building ours and peft ({method}, inference pair)")
    pair = _tampered(build_method_pair(spec, method, steps), tamper)
    report.info["lora_layers"] = len({name.split(".adapters.")[0] for name in pair.keymap})  # adapted modules
    batch = example_batch(pair.ours.base_model, spec)
    report.rows += [check_init(pair), check_counts(pair, tols["count"])]
    infer = _row("forward logits (inference: eval, no_grad)",
                 *diff(logits_of(pair.ours, batch, "inference"), logits_of(pair.peft, batch, "inference")),
                 tols["inference"])
    state = [q.detach().clone() for _, q in pair.keymap.values()]  # peft's: a tamper changes ours only
    del pair

    say("gradients, training trajectory and files")
    pair = _tampered(build_method_pair(spec, method, steps, state), tamper)
    fwd, grads = check_grads(pair, batch, tols, [(n, p, q) for n, (p, q) in pair.keymap.items()],
                             "gradients of every trainable tensor")
    report.rows += [fwd, infer, grads]
    batches = [example_batch(pair.ours.base_model, spec, seed=100 + i) for i in range(steps)]
    report.rows += check_trajectory(pair, batches, tols["trajectory"], allocate=(method == "adalora"))
    with tempfile.TemporaryDirectory(prefix="compare-eq-") as tmp:
        report.rows += check_files(pair, spec, batch, tols["exact"], Path(tmp))
    del pair

    if method == "ia3" and spec.quantization == "none":  # peft merges IA3 into dense bases only
        say("merge")
        pair = _tampered(build_method_pair(spec, method, steps, state), tamper)
        report.rows.append(check_merge(pair, batch, tols["merged_outputs"]))
    report.info["seconds"] = time.perf_counter() - t0
    return report


def _tampered(pair: Pair, tamper) -> Pair:
    if tamper is not None:
        tamper(pair)
    return pair
