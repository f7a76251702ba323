"""Evaluation pieces the loop calls: token-level loss, eval loss/perplexity, exact-match of
generated completions (the tag score), and the loss plot."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F


def token_losses(model, batch: dict, seq2seq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (sum of token cross-entropies [B], number of target tokens [B]).

    The loop normalises by the token count of the whole global batch itself, so the gradient does
    not depend on how the batch is split into micro-batches or processes. Class labels [B]
    (sequence classification): the cross-entropy of each row's class, and a count of 1 per row.
    """
    if batch["labels"].dim() == 1:
        ce = F.cross_entropy(_class_logits(model, batch), batch["labels"], reduction="none")  # [B]
        return ce, torch.ones_like(batch["labels"])
    if seq2seq:
        # labels make the model build decoder inputs (labels shifted right); logits align with labels.
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
        logits, target = out.logits, batch["labels"]  # [B, T', V], [B, T']
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        # prompt tuning's logits also cover the virtual tokens in front (peft's shape): keep the last T
        logits = out.logits[:, out.logits.shape[1] - batch["labels"].shape[1]:]
        logits, target = logits[:, :-1], batch["labels"][:, 1:]  # predict token t+1 from <= t
    ce = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=-100, reduction="none")
    return ce.sum(dim=1), (target != -100).sum(dim=1)  # [B], [B]


def _class_logits(model, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()  # [B, C]


@torch.no_grad()
def eval_loss(model, eval_dl, accelerator, seq2seq: bool) -> dict:
    """Mean token loss over the eval set (all processes) and its perplexity; for sequence
    classification (class labels [B]) the mean loss per row and the accuracy."""
    model.eval()
    total, count, correct = (torch.zeros((), dtype=torch.float64) for _ in range(3))
    classify = False
    for batch in eval_dl:
        # gather_for_metrics drops the samples Accelerate duplicated to even out the last batch.
        if batch["labels"].dim() == 1:
            classify = True
            logits = _class_logits(model, batch)  # [B, C]
            s = F.cross_entropy(logits, batch["labels"], reduction="none")  # [B]
            s, hit = accelerator.gather_for_metrics((s, logits.argmax(-1) == batch["labels"]))
            n = torch.ones_like(s)
            correct += hit.double().sum().cpu()
        else:
            s, n = accelerator.gather_for_metrics(token_losses(model, batch, seq2seq))
        total += s.double().sum().cpu()
        count += n.double().sum().cpu()
    model.train()
    # No target token at all (the data checks refuse that before training): NaN, never a loss of 0.
    loss = (total / count).item() if count > 0 else float("nan")
    if classify:
        return {"eval_loss": loss, "accuracy": (correct / count).item()}
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], max_new_tokens: int,
                         seq2seq: bool, batch_size: int = 32, synced_gpus: bool = False) -> list[str]:
    """Greedy completions of `prompts` (left-padded batches), cut at eos and at the first newline.

    synced_gpus: every process runs this together (FSDP: each forward gathers weight shards from all
    of them), so all keep running forwards until the last one has finished its sequences.
    """
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # causal LMs continue from the last real token
    outs = []
    device = next(model.parameters()).device
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 synced_gpus=synced_gpus)
            new = gen if seq2seq else gen[:, enc["input_ids"].shape[1]:]
            outs += [t.split("\n")[0] for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outs


def exact_match(generated: list[str], references: list[str]) -> float:
    """Fraction of completions equal to the reference after stripping surrounding whitespace."""
    if not references:
        return float("nan")
    return sum(g.strip() == r.strip() for g, r in zip(generated, references)) / len(references)


def plot_losses(log: list[dict], path: Path) -> None:
    """loss.png: train loss per logged step and eval loss per evaluation."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (per token; per row when classifying)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(".tmp-" + path.name)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
