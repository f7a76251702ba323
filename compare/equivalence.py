"""`python -m compare equivalence`: ours against peft, row by row, on the same base and LoRA weights.

Each check loads a fresh pair (`models.build_pair`) where the order of operations could otherwise
leak between checks: bitsandbytes' CPU inference path repacks 4-bit weights in place, so the
inference-mode forward runs on its own pair, never before a training-mode check.

Two forward modes are used:
- "exact" = `model.train()` with every dropout set to 0: bitsandbytes dequantizes the weight and
  runs a plain matmul in the compute dtype (4-bit: `matmul_4bit`; int8 on CPU: `MatMul8bitFp`),
  so ours and peft compute the same math and tight tolerances apply;
- "inference" = `model.eval()` under `torch.no_grad()`, what users run for generation: on CPU,
  bitsandbytes switches to its own kernels (bf16 4-bit GEMM, int8 activations), which ours does
  not imitate, so that row's tolerance says so.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import models
from .models import ModelSpec, Pair, adapter_tensors, build_pair, example_batch, lora_params, lora_state
from .report import Row, diff, row_dict, table


# ---------------------------------------------------------------------------------------------
# tolerances: relative, i.e. max |ours - peft| / max |peft|, each with its reason


def tolerances(spec: ModelSpec, device: str = "cpu") -> dict[str, tuple[float, str]]:
    """{check kind: (relative tolerance, reason)} for this dtype, quantization and kernel."""
    if spec.dtype == "float32":
        exact = (1e-4, "fp32 on both sides, operations in a different order (LoRA branch added "
                       "before/after the bias, fused GEMMs): reassociation error ~1e-6; a 1% error in "
                       "one LoRA delta shows above 1e-3")
    else:
        exact = (5e-2, f"{spec.dtype} base: one rounding is 2^-8 (bf16) / 2^-11 (fp16) relative, every "
                       "layer rounds several times (attention, MLP, residual, the LoRA branch cast back "
                       "from fp32) and the two sides do not round at the same points: a few ulps of the "
                       "largest logit (measured 1.3e-2 to 1.7e-2 on the tiny default in bf16)")
    if spec.backend == "triton" and device == "cuda" and spec.dtype == "float32":
        exact = (2e-2, "triton on CUDA: tl.dot on fp32 inputs uses TF32 (10 mantissa bits)")
    elif spec.backend == "triton" and exact[0] < 1e-3:
        exact = (1e-3, "triton: fp32 block-wise accumulation in a different order than torch's GEMM")

    if spec.quantization in ("nf4", "fp4") and device == "cpu":
        infer = (max(exact[0] * 2, 5e-2),
                 "peft's inference forward runs bitsandbytes' CPU 4-bit kernel (weights repacked, GEMM "
                 "in bf16: ~4e-3 per layer, compounded over layers); ours dequantizes exactly")
    elif spec.quantization == "int8":
        infer = (max(exact[0] * 2, 5e-2),
                 "peft's inference forward runs bitsandbytes' int8 matmul (activations quantized to "
                 "int8 per row, outliers above 6.0 in fp16: ~7e-3 per layer); ours dequantizes W "
                 "exactly")
    else:
        infer = exact

    if spec.quantization == "none" and spec.dtype == "float32":
        merged_w = (1e-5, "W + s*B@A in fp32 on both sides, summed in a different order")
        merged_out = exact
    elif spec.quantization == "none":
        merged_w = (2e-2, f"{spec.dtype} W + s*B@A: peft adds a delta already rounded to {spec.dtype} "
                          "(two roundings), ours rounds W + delta once: up to one ulp (2^-8 of the "
                          "element for bf16) apart")
        merged_out = exact
    else:
        merged_w = (1.0, f"here rel = ||ours - peft|| / ||peft - (W + s*B@A)||: the distance between "
                         f"the two {spec.quantization} re-quantized merges in units of peft's own "
                         "re-quantization error (worst layer); both round W + s*B@A to codes, so they "
                         "may differ by about that error, a wrong delta by much more")
        merged_out = ((2e-2, "merged outputs on re-quantized weights: identical codes give identical "
                             "outputs; a few flipped codes move them by ~1e-2") if spec.dtype == "float32"
                      else (1e-1, f"merged outputs on re-quantized weights in {spec.dtype}: the flipped "
                                  "codes (see merged weights; each a step of up to ~0.2 x absmax) move "
                                  "outputs by a few %"))
    if spec.dtype == "float32":
        traj = (exact[0], "the loss is one number per step; rounding differences compound through "
                          "AdamW updates (measured ~1e-7 on the tiny default in fp32; a LoRA layer with "
                          "its scaling doubled shows ~1e-3)")
    else:
        traj = (1e-2, f"the loss averages per-token rounding of the {spec.dtype} logits (measured "
                      "~2e-3 on the tiny default), then AdamW steps compound it")
    if spec.dtype == "float32":
        grad = (exact[0] * 10, "gradients sum over batch and sequence and pass back through every "
                               "layer: 10x the forward's tolerance (measured ~5e-7 on the tiny default)")
    else:
        grad = (exact[0] * 2, f"gradients pass back through every {spec.dtype} layer and its roundings: "
                              "2x the forward's tolerance (measured 1.9e-2 to 3.1e-2 on the tiny default)")
    if spec.dtype != "float32" and spec.use_dora:
        init_tol = (2e-2, f"peft computes DoRA's initial norm ||W + s B A|| in {spec.dtype} (its A and B "
                          "already rounded to it), ours in fp32 rounded once: a few ulps (measured 6e-3 in bf16)")
    elif spec.dtype != "float32":
        init_tol = (2 ** -8, f"peft rounds every adapter init to the {spec.dtype} compute dtype before "
                             "upcasting it to fp32 (ours keeps the fp32 values): one rounding apart")
    else:
        init_tol = (1e-6, "the same draws from the same seed and the same fp32 factorizations of the same "
                          "base (measured 0 on the tiny Llama)")
    return {"exact": exact, "inference": infer, "grad": grad,
            "merged_weights": merged_w, "merged_outputs": merged_out, "trajectory": traj,
            "count": (0.0, "integer counts: exact"), "init": init_tol}


# ---------------------------------------------------------------------------------------------
# helpers


def no_dropout(model) -> None:
    """Switch off every dropout (both sides alike) so train-mode passes are deterministic.

    nn.Dropout modules get p=0; float attributes named like a dropout rate (T5Attention.dropout,
    LlamaAttention.attention_dropout, Bloom's hidden_dropout, ...) feed functional dropout and
    SDPA's dropout_p in train mode, so they are zeroed too, on modules and on the config.
    """
    def is_rate(name: str, value) -> bool:
        return isinstance(value, float) and not isinstance(value, bool) and (
            "dropout" in name or "pdrop" in name)

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if is_rate(name, value):
                setattr(m, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for name, value in list(vars(config).items()):
            if is_rate(name, value):
                setattr(config, name, 0.0)


def logits_of(model, batch: dict, mode: str) -> torch.Tensor:
    """Logits [batch, seq, vocab] in "exact" (train mode, no grad) or "inference" mode (eval)."""
    if mode == "exact":
        model.train()
    else:
        model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def dense_weight(module) -> torch.Tensor:
    """The effective weight [out, in] in fp32 of a (merged) linear module of any supported kind."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    w = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        qs = w.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            raise models.CompareError("4-bit weight already repacked by bitsandbytes' CPU inference "
                                      "path; read merged weights before any inference forward")
        return bnbf.dequantize_4bit(w.data, qs).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        cb = w.data if w.dtype == torch.int8 else module.state.CB
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = module.state.SCB
        return cb.float() * scb.float()[:, None] / 127.0
    if type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
        return w.detach().float().t()
    return w.detach().float()


def _worst(items: list[tuple[str, float, float]]) -> tuple[float, float, str]:
    """(max_abs, rel, name) of the item with the largest relative difference."""
    if not items:
        return 0.0, 0.0, ""
    name, a, r = max(items, key=lambda t: (t[2], t[1]))
    return a, r, name


def _row(check, max_abs, rel, tol, where="", detail=None) -> Row:
    return Row(check=check, max_abs=max_abs, rel=rel, tol=tol[0], ok=bool(rel <= tol[0]),
               where=where, reason=tol[1], detail=detail or {})


# ---------------------------------------------------------------------------------------------
# the checks


@dataclass
class Report:
    """All rows of one equivalence run plus what it ran on."""

    spec: ModelSpec
    rows: list[Row] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def failed(self) -> list[str]:
        return [r.check for r in self.rows if not r.ok]

    def row(self, check_prefix: str) -> Row:
        for r in self.rows:
            if r.check.startswith(check_prefix):
                return r
        raise KeyError(check_prefix)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "failed": self.failed(), "spec": vars(self.spec), "info": self.info,
                "rows": [row_dict(r) for r in self.rows]}

    def format(self) -> str:
        """The table, then the tolerance reasons as numbered footnotes."""
        reasons: list[str] = []
        body = []
        for r in self.rows:
            if r.reason not in reasons:
                reasons.append(r.reason)
            body.append([r.check, r.max_abs, r.rel, r.tol, f"[{reasons.index(r.reason) + 1}]",
                         r.verdict, r.where])
        head = (f"equivalence vs peft: method={self.info.get('method', 'lora')} model={self.info.get('model')} "
                f"quantization={self.spec.quantization} "
                f"dtype={self.spec.dtype} backend={self.spec.backend} r={self.spec.r} "
                f"alpha={self.spec.lora_alpha} layers={self.info.get('lora_layers')} "
                f"batch={self.spec.batch}x{self.spec.seq}")
        out = [head, table(["check", "max_abs", "rel", "tol(rel)", "why", "verdict", "worst / note"], body),
               "rel = max|ours - peft| / max|peft|; tolerances:"]
        out += [f"  [{i + 1}] {t}" for i, t in enumerate(reasons)]
        out.append(f"RESULT: {'PASS' if self.ok else 'FAIL (' + ', '.join(self.failed()) + ')'}"
                   f"  ({self.info.get('seconds', 0):.1f}s)")
        return "\n".join(out)


def check_counts(pair: Pair, tol) -> Row:
    ours_t, ours_all = pair.ours.trainable_parameters()
    peft_t, peft_all = pair.peft.get_nb_trainable_parameters()
    dt, da = abs(int(ours_t) - int(peft_t)), abs(int(ours_all) - int(peft_all))
    return Row("trainable parameters", float(max(dt, da)), float(max(dt, da)), tol[0],
               ok=(dt == 0 and da == 0), reason=tol[1],
               where=f"ours {ours_t:,}/{ours_all:,} peft {peft_t:,}/{peft_all:,}",
               detail={"ours": [int(ours_t), int(ours_all)], "peft": [int(peft_t), int(peft_all)]})


def check_grads(pair: Pair, batch: dict, tols, tensors=None, what: Optional[str] = None) -> tuple[Row, Row]:
    """Forward logits (exact mode) and the gradient of every adapter tensor from one train-mode pass.

    tensors: [(name, ours tensor, peft tensor)] whose gradients to compare (default: every tensor
    of every LoRA-layer pair in the keymap); what: the gradient row's title (default: named from them).
    """
    outs = {}
    for side, model in (("ours", pair.ours), ("peft", pair.peft)):
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        outs[side] = out.logits.detach().float()
    fwd = _row("forward logits (train mode)", *diff(outs["ours"], outs["peft"]), tols["exact"])
    if tensors is None:
        tensors = [(f"{path}.{name}", a, adapter_tensors(theirs)[name])
                   for path, (mine, theirs) in pair.keymap.items() for name, a in adapter_tensors(mine).items()]
        extra = sorted({n.rsplit(".", 1)[-1] for n, _, _ in tensors} - {"lora_A", "lora_B"})
        what = what or "gradients of every A and B" + "".join(f", {n}" for n in extra)
    items = []
    for name, a, b in tensors:
        if a.grad is None or b.grad is None:
            missing = "ours" if a.grad is None else "peft"
            items.append((f"{name} (no grad on {missing})", float("inf"), float("inf")))
        else:
            items.append((name, *diff(a.grad, b.grad)))
    a, r, where = _worst(items)
    grads = _row(f"{what or 'gradients'} ({len(items)})", a, r, tols["grad"], where=where)
    for model in (pair.ours, pair.peft):
        model.zero_grad(set_to_none=True)
    return fwd, grads


def check_trajectory(pair: Pair, batches: list[dict], tol, lr: float = 1e-3) -> Row:
    """N AdamW steps on the same batches on both sides; compares the loss at every step."""
    losses = {side: _adamw_losses(model, batches, lr) for side, model in (("ours", pair.ours), ("peft", pair.peft))}
    return _trajectory_row(f"training trajectory ({len(batches)} AdamW steps, loss)", losses, tol, {"lr": lr})


def _adamw_losses(model, batches: list[dict], lr: float = 1e-3, params: Optional[list] = None,
                  after_step: Optional[Callable[[int], None]] = None) -> list[float]:
    """The loss of each of len(batches) AdamW steps on `params` (default: `model`'s LoRA parameters),
    in train mode; after_step(step) runs after each optimizer step, the gradients still there."""
    model.train()
    opt = torch.optim.AdamW(lora_params(model) if params is None else params, lr=lr, weight_decay=0.01)
    seq = []
    for step, b in enumerate(batches, start=1):
        opt.zero_grad(set_to_none=True)
        loss = model(**b).loss
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(step)
        seq.append(loss.item())
    opt.zero_grad(set_to_none=True)
    return seq


def _trajectory_row(name: str, losses: dict, tol, detail: dict) -> Row:
    o, p = torch.tensor(losses["ours"]), torch.tensor(losses["peft"])
    per_step = ((o - p).abs() / p.abs().clamp_min(1e-12)).tolist()
    worst = max(range(len(per_step)), key=per_step.__getitem__)
    return _row(name, (o - p).abs().max().item(), per_step[worst], tol,
                where=f"step {worst + 1}: ours {o[worst]:.6f} peft {p[worst]:.6f}",
                detail={"loss_ours": losses["ours"], "loss_peft": losses["peft"], **detail})


def dropout_trajectory_tolerance(spec: ModelSpec, device: str, tol_traj) -> Optional[tuple[float, str]]:
    """The dropout-on row's tolerance, or None when the row does not apply: only the torch backend
    draws peft's masks (the triton kernels draw Philox masks, so their dropout noise differs)."""
    if not (spec.backend == "torch" or (spec.backend == "auto" and device == "cpu")):
        return None
    if device == "cpu" and spec.dtype == "float32" and spec.quantization in ("none", "nf4", "fp4"):
        return (0.0, "lora_dropout on, same torch.manual_seed: ours draws peft's masks (torch's generator, "
                     "same F.dropout calls in the same order) and runs peft's ops: bit for bit")
    return (tol_traj[0], tol_traj[1] + "; with lora_dropout on, same seed, the same masks on both sides")


def check_dropout_trajectory(pair: Pair, batches: list[dict], tol, p: float = 0.05, seed: int = 1234) -> Row:
    """The trajectory check with every LoRA dropout at p on both sides, from the same torch.manual_seed."""
    from .speed import set_lora_dropout

    set_lora_dropout(pair.keymap, p)
    losses = {}
    for side, model in (("ours", pair.ours), ("peft", pair.peft)):
        torch.manual_seed(seed)  # the same generator state: the same masks, drawn in the same order
        losses[side] = _adamw_losses(model, batches)
    return _trajectory_row(f"training trajectory, lora_dropout={p} ({len(batches)} AdamW steps, loss)", losses,
                           tol, {"lora_dropout": p, "seed": seed})


def _same_tensors(pair_like: dict) -> tuple[float, str]:
    """Max |difference| between LoRA tensors that should be bit-identical after a file round trip."""
    worst, where = 0.0, ""
    for name, (a, b) in pair_like.items():
        d = (a.detach().float() - b.detach().float()).abs().max().item()
        if d > worst or not where:
            worst, where = d, name
    return worst, where


def check_adapter_files(pair: Pair, spec: ModelSpec, batch: dict, tol, tmp: Path) -> tuple[Row, Row]:
    """Our save_pretrained -> peft.PeftModel.from_pretrained, and peft's file -> LoraModel.from_pretrained.

    Each row compares the loaded model's outputs with the model that wrote the file (exact mode),
    and fails outright if any LoRA tensor did not survive the round trip bit for bit.
    """
    import lora_core
    import peft

    ours_dir, peft_dir = tmp / "ours_adapter", tmp / "peft_adapter"
    pair.ours.save_pretrained(str(ours_dir))
    pair.peft.save_pretrained(str(peft_dir))

    # each load re-runs the adapter's init first (a PiSSA / OLoRA residual; pissa_niter draws): from
    # the seed the pair was built with, so both rebuild the writer's base
    torch.manual_seed(spec.seed)
    loaded_p = peft.PeftModel.from_pretrained(models.load_base(spec), str(ours_dir))
    no_dropout(loaded_p)
    row_p = _file_row("our adapter file -> peft", {p: adapter_tensors(m) for p, (m, _) in pair.keymap.items()},
                      models.peft_lora_layers(loaded_p), loaded_p, pair.ours, batch, tol)

    torch.manual_seed(spec.seed)
    loaded_o = lora_core.LoraModel.from_pretrained(models.load_base(spec), str(peft_dir))
    loaded_o.set_backend(spec.backend)
    no_dropout(loaded_o)
    row_o = _file_row("peft adapter file -> ours", {p: adapter_tensors(t) for p, (_, t) in pair.keymap.items()},
                      dict(loaded_o.lora_layers()), loaded_o, pair.peft, batch, tol)
    return row_p, row_o


def _file_row(name: str, written: dict, loaded_layers: dict, loaded, writer, batch: dict, tol) -> Row:
    """One round-trip row: the loaded model's logits against the writer's (exact mode), failing
    outright unless every adapter tensor came back bit for bit. written: {path: {name: tensor}} of
    the writer (adapter_tensors); loaded_layers: {path: layer} of the loaded model."""
    tensors = {}
    for path, mine in written.items():
        if path not in loaded_layers:
            tensors[f"{path} (missing after loading)"] = (torch.ones(1), torch.zeros(1) + float("inf"))
            continue
        back = adapter_tensors(loaded_layers[path])
        for key, t in mine.items():
            tensors[f"{path}.{key}"] = (back.get(key, torch.full_like(t, float("inf"))), t)
    t_diff, t_where = _same_tensors(tensors)
    a, r = diff(logits_of(loaded, batch, "exact"), logits_of(writer, batch, "exact"))
    row = _row(name, a, r, tol,
               where=("tensors bit-identical" if t_diff == 0 else
                      f"tensor changed in the file: {t_where} by {t_diff:.3g}"),
               detail={"tensor_max_abs": t_diff})
    row.ok = row.ok and t_diff == 0
    return row


def check_merge(pair: Pair, batch: dict, tols, quantization: str) -> tuple[Row, Row]:
    """merge_and_unload on both sides: merged weights of every target layer, then merged outputs.

    Dense bases compare the merged weights directly. Quantized bases re-quantize W + s*B@A on both
    sides, where one element flipping to the neighbouring code (and, with double quantization, a
    block's absmax moving) is a legitimate difference; so the distance between the two merges is
    measured against peft's own re-quantization error, in Frobenius norm.
    """
    keys = list(pair.keymap)
    exact_merge = {}
    if quantization != "none":
        for path, (mine, theirs) in pair.keymap.items():
            # M = W + s*B@A in fp32 (DoRA: f * (W + s*B@A), f = m / ||W + s*B@A|| per row), from
            # peft's W and the adapter tensors both sides share
            W = dense_weight(theirs.get_base_layer())
            adapter = mine.adapters["default"]
            f = adapter.merge_scale(W) if getattr(adapter, "needs_base", False) else None
            merged = W + adapter.delta_weight()
            exact_merge[path] = (merged if f is None else f[:, None] * merged).detach()
    refused = _merge_refusals(pair)
    if refused is not None:
        return refused
    m_ours = pair.ours.merge_and_unload()
    m_peft = pair.peft.merge_and_unload()
    items, detail = [], {}
    for path in keys:
        a, b = dense_weight(m_ours.get_submodule(path)), dense_weight(m_peft.get_submodule(path))
        max_abs, rel = diff(a, b)
        if quantization != "none":
            m = exact_merge[path]
            q_err = (b - m).norm().item()
            rel = (a - b).norm().item() / max(q_err, 1e-12)
            detail[path] = {"ours_vs_peft_frob": (a - b).norm().item(), "peft_requant_err_frob": q_err,
                            "ours_requant_err_frob": (a - m).norm().item()}
        items.append((path, max_abs, rel))
    a, r, where = _worst(items)
    w_row = _row(f"merged weights ({len(items)} layers)", a, r, tols["merged_weights"], where=where,
                 detail=detail)
    no_dropout(m_ours)
    no_dropout(m_peft)
    o_row = _row("merged outputs", *diff(logits_of(m_ours, batch, "exact"), logits_of(m_peft, batch, "exact")),
                 tols["merged_outputs"])
    return w_row, o_row


def _merge_refusals(pair: Pair) -> Optional[tuple[Row, Row]]:
    """When the adapter cannot be merged (lora_bias on layers without a base bias), both sides must
    refuse, and ours with nothing changed: two rows saying so; None when it can be merged."""
    layers = pair.ours.lora_layers()
    problem = None
    for m in layers.values():
        try:
            m.mergeable(["default"])
        except ValueError as e:  # a method or variant that cannot be merged here
            problem = str(e)
            break
    if problem is None:
        return None
    before = {p: dense_weight(m.base_layer) for p, m in layers.items()}
    try:
        pair.ours.merge_adapter()
        ours_refused = False
    except ValueError:
        ours_refused = not any(m.merged for m in layers.values()) and all(
            torch.equal(dense_weight(m.base_layer), before[p]) for p, m in layers.items())
    try:
        pair.peft.merge_adapter()
        peft_refused = False
    except Exception:  # peft refuses with RuntimeError (dense) or fails on None (bnb 4-bit)
        peft_refused = True
    ok = ours_refused and peft_refused
    why = (0.0, "the adapter cannot be merged here: both sides must refuse (ours with nothing changed)")
    rows = []
    for check in ("merged weights", "merged outputs"):
        row = _row(f"{check}: merge refused on both sides", 0.0 if ok else 1.0, 0.0 if ok else 1.0, why,
                   where=problem[:90] if ok else f"ours refused: {ours_refused}, peft refused: "
                                                                 f"{peft_refused}")
        row.ok = ok
        rows.append(row)
    return rows[0], rows[1]


SECOND = "second"  # the name of the second adapter in the multi-adapter rows


def add_second_adapter(pair: Pair, spec: ModelSpec, seed: int) -> dict:
    """A second adapter on both sides, of another rank (2r) and other targets ("all-linear"), with
    the same seeded non-zero weights; returns its key map (the layers holding it)."""
    import lora_core
    import peft

    cfg = dict(r=2 * spec.r, lora_alpha=spec.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
               **spec.variant_kwargs())
    torch.manual_seed(seed)
    pair.ours.add_adapter(SECOND, lora_core.LoraConfig(**cfg))
    torch.manual_seed(seed)
    pair.peft.add_adapter(SECOND, peft.LoraConfig(**cfg))
    keymap = models.make_keymap(pair.ours, pair.peft, adapter=SECOND)
    models.seed_lora_weights(keymap, seed, adapter=SECOND)
    return keymap


def check_second_adapter(pair: Pair, spec: ModelSpec, batch: dict, tol) -> Row:
    """set_adapter(second) on both sides: logits (exact mode) of the second adapter alone."""
    keymap = add_second_adapter(pair, spec, spec.seed + 1)
    for model in (pair.ours, pair.peft):
        model.set_adapter(SECOND)
    a, r = diff(logits_of(pair.ours, batch, "exact"), logits_of(pair.peft, batch, "exact"))
    return _row(f"second adapter (r={2 * spec.r}, all-linear, {len(keymap)} layers): set_adapter logits",
                a, r, tol)


def check_mixed_batch(pair: Pair, spec: ModelSpec, tol) -> Row:
    """One inference batch whose rows use "default", the second adapter and "__base__"; fails
    outright unless our "__base__" row equals our base model's output for that row exactly."""
    names = ["default", SECOND, "__base__"]
    batch = example_batch(pair.ours.base_model, ModelSpec(**{**vars(spec), "batch": len(names)}), seed=7)
    batch = {"input_ids": batch["input_ids"]}
    outs = {}
    for side, model in (("ours", pair.ours), ("peft", pair.peft)):
        model.eval()
        with torch.no_grad():
            if side == "peft" and spec.use_dora:  # peft refuses adapter_names with DoRA: row by row
                outs[side] = torch.cat([_one_row(model, batch["input_ids"][i:i + 1], n) for i, n in enumerate(names)])
            else:
                outs[side] = model(**batch, adapter_names=names).logits.float()
    with torch.no_grad(), pair.ours.disable_adapter():
        base = pair.ours(**batch).logits.float()
    base_diff = (outs["ours"][2] - base[2]).abs().max().item()
    row = _row(f"mixed batch {names} (inference)", *diff(outs["ours"], outs["peft"]), tol,
               where=("base row equals the base model" if base_diff == 0 else
                      f"base row differs from the base model by {base_diff:.3g}"))
    row.ok = row.ok and base_diff == 0
    return row


def _one_row(model, ids: torch.Tensor, name: str) -> torch.Tensor:
    """Logits of one row with adapter `name` alone ("__base__": adapters off)."""
    if name == "__base__":
        with model.disable_adapter():
            return model(input_ids=ids).logits.float()
    model.set_adapter(name)
    return model(input_ids=ids).logits.float()


def check_init(spec: ModelSpec, tol) -> Row:
    """A pair built from the same seed, before any weights are copied in: every adapter tensor and
    every LoRA layer's base weight (the residual a PiSSA / OLoRA init wrote) as peft's."""
    pair = build_pair(spec, keep_init=True)
    items = []
    for path, (mine, theirs) in pair.keymap.items():
        peft_tensors = adapter_tensors(theirs)
        for name, t in adapter_tensors(mine).items():
            items.append((f"{path}.{name}", *diff(t, peft_tensors[name])))
        items.append((f"{path}.base weight", *diff(dense_weight(mine.base_layer),
                                                      dense_weight(theirs.get_base_layer()))))
    a, r, where = _worst(items)
    init = spec.variant_kwargs()["init_lora_weights"]
    return _row(f"init {init!r} from the same seed: adapter tensors and base weights ({len(items)})", a, r, tol,
                where=where)


def probe_backend(model, batch: dict, spec: ModelSpec) -> None:
    """One forward and backward of ours with the chosen backend; a backend that cannot run here
    becomes a CompareError naming it (before any row is measured). Leaves no gradients behind."""
    model.train()
    try:
        model(**batch).loss.backward()
    except (NotImplementedError, ValueError, RuntimeError, ImportError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise models.CompareError(
            f"our model cannot run with backend={spec.backend!r} on this machine "
            f"(quantization={spec.quantization}, dtype={spec.dtype}): {msg}") from None
    finally:
        model.zero_grad(set_to_none=True)


def run_equivalence(spec: ModelSpec, steps: int = 4, progress: Optional[Callable[[str], None]] = None,
                    tamper: Optional[Callable[[Pair], None]] = None) -> Report:
    """Run every check and return the report (its rows in the order they print).

    steps: AdamW steps in the trajectory check. tamper: called on each freshly built pair before
    it is measured (tests use it to break a layer on purpose and see the right row fail).
    """
    spec.validate()
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tols = tolerances(spec, device)
    report = Report(spec)
    report.info["model"] = spec.model if spec.model != "tiny" else f"tiny ({models.tiny_checkpoint()[1]})"

    def pair_for(weights=None) -> Pair:
        pair = build_pair(spec, weights)
        no_dropout(pair.ours)
        no_dropout(pair.peft)
        if tamper is not None:
            tamper(pair)
        return pair

    # 1. inference forward and counts, on a pair nothing else has touched
    say("building ours and peft (inference pair)")
    pair = pair_for()
    report.info["lora_layers"] = len(pair.keymap)
    batch = example_batch(pair.ours.base_model, spec)
    probe_backend(pair.ours, batch, spec)
    report.rows.append(check_counts(pair, tols["count"]))
    report.rows.append(check_init(spec, tols["init"]))
    a, r = diff(logits_of(pair.ours, batch, "inference"), logits_of(pair.peft, batch, "inference"))
    infer_row = _row("forward logits (inference: eval, no_grad)", a, r, tols["inference"])
    del pair

    # 2. train-mode forward, gradients, then the trajectory, on a second fresh pair
    say("gradients and training trajectory")
    pair = pair_for()
    fwd_row, grad_row = check_grads(pair, batch, tols)
    report.rows += [fwd_row, infer_row, grad_row]
    batches = [example_batch(pair.ours.base_model, spec, seed=100 + i) for i in range(steps)]
    report.rows.append(check_trajectory(pair, batches, tols["trajectory"]))

    tol = dropout_trajectory_tolerance(spec, device, tols["trajectory"])
    if tol is not None:  # on a fresh pair, so both sides start from the same weights
        say("training trajectory with lora_dropout on")
        report.rows.append(check_dropout_trajectory(pair_for(), batches, tol))

    # 3. adapter files both ways, with the trained (non-trivial) weights
    say("adapter files both ways")
    with tempfile.TemporaryDirectory(prefix="compare-eq-") as tmp:
        report.rows += list(check_adapter_files(pair, spec, batch, tols["exact"], Path(tmp)))
    trained = lora_state(pair.keymap)
    del pair

    # 4. merge on a fresh pair carrying the trained weights (identical on both sides)
    say("merge_and_unload")
    pair = pair_for(trained)
    report.rows += list(check_merge(pair, batch, tols, spec.quantization))
    del pair

    # 5. a second adapter, then a mixed batch, on a fresh pair (the inference forward comes last:
    # bitsandbytes may repack peft's 4-bit weights in place on CPU)
    say("second adapter and mixed batch")
    pair = pair_for(trained)
    report.rows.append(check_second_adapter(pair, spec, batch, tols["exact"]))
    report.rows.append(check_mixed_batch(pair, spec, tols["inference"]))
    report.info["seconds"] = time.perf_counter() - t0
    return report
