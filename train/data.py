"""Data: a hub or local dataset -> text from a template -> tokens (+ labels) -> padded batches.

Every check that can fail on user input runs in `load_splits` / `check_template`, before tokenizing
and before the model is loaded, so bad input costs nothing and writes nothing.
"""
from __future__ import annotations

import codecs
import json
import string
import sys
from pathlib import Path

import datasets
import torch

from .config import BUILTIN_DATASET
from .errors import TrainError
from .models import ASSETS

# Warn when at least this share of rows loses its whole completion to --max-length.
WARN_LOST_SHARE = 0.1

# file suffix -> datasets builder
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
EVAL_SPLITS = ("validation", "test", "eval")


def _looks_local(name: str) -> bool:
    return Path(name).suffix in BUILDERS or name.startswith((".", "/", "~")) or "\\" in name


def load_splits(name: str, eval_split_size: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval) raw datasets. Without an eval split, hold out `eval_split_size` of train."""
    return split_eval(load_raw(name), name, eval_split_size, seed)


def load_raw(name: str) -> datasets.DatasetDict:
    """The dataset's splits as loaded (a local file or folder, or a hub name); TrainError if it
    cannot be read, naming the line of a file that is not UTF-8 or not valid JSON."""
    if name == BUILTIN_DATASET:
        name = str(ASSETS / "tagger.jsonl")
    path = Path(name).expanduser()
    if path.is_file():
        builder = BUILDERS.get(path.suffix)
        if builder is None:
            raise TrainError(f"dataset file {path} has suffix {path.suffix!r}; use one of "
                             f"{', '.join(sorted(BUILDERS))}")
        if path.stat().st_size < 4096 and not path.read_bytes().strip():  # whitespace only
            raise TrainError(f"dataset file {path} is empty; it needs at least one row")
        if builder != "parquet":
            _check_utf8(path)
        try:
            return _load(builder, data_files=str(path))
        except TrainError:
            problem = _json_problem(path) if builder == "json" else None
            if problem:
                raise TrainError(f"dataset file {path}: {problem}") from None
            raise
    if path.is_dir():
        return _load(str(path))
    if _looks_local(name):
        raise TrainError(f"dataset file {path} does not exist; pass an existing .json/.jsonl/.csv/"
                         f".parquet/.txt file or a hub dataset name")
    return _load(name)


def split_eval(dsd: datasets.DatasetDict, name: str, eval_split_size: float, seed: int
               ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval): the dataset's own eval split, else `eval_split_size` of train held out."""
    if "train" not in dsd:
        raise TrainError(f"dataset {name} has no 'train' split (splits: {', '.join(dsd)})")
    train = dsd["train"]
    if len(train) == 0:
        raise TrainError(f"dataset {name} is empty (0 rows in its train split)")
    for split in EVAL_SPLITS:
        if split in dsd and len(dsd[split]) > 0:
            return train, dsd[split]
    if len(train) < 2:
        raise TrainError(f"dataset {name} has {len(train)} row; need at least 2 to hold out an eval split")
    parts = train.train_test_split(test_size=eval_split_size, seed=seed)
    return parts["train"], parts["test"]


def _load(*args, **kwargs) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(*args, **kwargs)
    except TrainError:
        raise
    except Exception as e:  # offline hub, bad file, ...: one line naming what failed
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        where = kwargs.get("data_files") or (args[0] if args else "")
        if "corresponds to no data" in msg or isinstance(e, StopIteration):
            raise TrainError(f"dataset {where} is empty (no rows); it needs at least one row") from None
        raise TrainError(f"could not load dataset {args[0] if args else ''} "
                         f"{kwargs.get('data_files', '')}: {msg}".replace("  ", " ")) from None


def _check_utf8(path: Path) -> None:
    """TrainError naming the line of the first byte that is not UTF-8 (datasets would fail later
    with a traceback, or read the text with replacement characters)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                line += e.object[:e.start].count(b"\n")
                raise TrainError(f"dataset file {path} is not UTF-8 text: byte 0x{e.object[e.start]:02x} on "
                                 f"line {line} ({e.reason}); re-save the file as UTF-8") from None
            if not chunk:
                return
            line += chunk.count(b"\n")


def _json_problem(path: Path) -> str | None:
    """Where a .json/.jsonl file is not valid JSON ("line 3: Expecting value (column 12)"), or None."""
    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
        return None  # one valid JSON document: the problem is elsewhere
    except json.JSONDecodeError as whole:
        lines = text.splitlines()
        first = next((ln for ln in lines if ln.strip()), "")
        try:
            json.loads(first)
        except json.JSONDecodeError:  # not JSON lines: the document's own error position
            return f"not valid JSON at line {whole.lineno}: {whole.msg} (column {whole.colno})"
        for i, ln in enumerate(lines, 1):
            if not ln.strip():
                continue
            try:
                row = json.loads(ln)
            except json.JSONDecodeError as e:
                return f"line {i} is not valid JSON: {e.msg} (column {e.colno})"
            if not isinstance(row, dict):
                return f"line {i} is a JSON {type(row).__name__}, not an object with one key per column"
    return None


def template_fields(template: str) -> list[str]:
    """Column names a str.format template refers to, e.g. '{quote} ->: {tags}' -> [quote, tags]."""
    return [f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(template) if f]


def check_template(template: str, columns: list[str], separator: str, completion_only: bool) -> None:
    """Raise TrainError when the template names a missing column or lacks the separator."""
    try:
        fields = template_fields(template)
    except ValueError as e:
        raise TrainError(f"--text-template {template!r} is not a valid format string: {e}") from None
    missing = [f for f in fields if f not in columns]
    if missing:
        raise TrainError(f"--text-template names column(s) {', '.join(missing)} that the dataset lacks; "
                         f"its columns are: {', '.join(columns)}")
    if not fields:
        raise TrainError(f"--text-template {template!r} names no column; columns are: {', '.join(columns)}")
    if completion_only and separator not in template:
        raise TrainError(f"--completion-separator {separator!r} does not occur in --text-template "
                         f"{template!r}; change one, or pass --no-completion-only-loss")


def check_rows(dsd: datasets.DatasetDict, template: str, name: str) -> None:
    """TrainError naming the first row that lacks a value the template needs (a missing key or a
    null): str.format would train on the text "None" instead."""
    for split, ds in dsd.items():
        for col in dict.fromkeys(template_fields(template)):
            if col not in ds.column_names or ds.data.column(col).null_count == 0:
                continue
            i = next(i for i, v in enumerate(ds[col]) if v is None)
            row = json.dumps(ds[i], default=str)
            row = row if len(row) <= 120 else row[:117] + "..."
            raise TrainError(f"row {i + 1} of the {split} split of {name} has no value for column "
                             f"{col!r}, which --text-template needs: {row}; fill it in or drop the row")


def check_targets(tokenized: dict[str, datasets.Dataset], shift: int, max_length: int, warn: bool = True) -> None:
    """Refuse a split in which --max-length leaves no target token in any row (eval would report
    loss 0.0, training would learn nothing); warn when a large share of rows loses its targets.

    tokenized: {"train": ds, "eval": ds} of {input_ids, labels}; shift: 1 for causal LMs (label t is
    predicted from tokens < t, so label 0 never counts), 0 for seq2seq.
    """
    for split, ds in tokenized.items():
        labels = ds["labels"]
        lost = sum(1 for lab in labels if all(t == -100 for t in lab[shift:]))
        if lost == len(labels):
            raise TrainError(f"--max-length {max_length} leaves no target token in any of the {lost} {split} "
                             f"rows (the prompt fills the whole length): nothing to "
                             f"{'train on' if split == 'train' else 'evaluate (loss would read 0.0)'}; "
                             f"raise --max-length")
        if warn and lost and lost >= WARN_LOST_SHARE * len(labels):
            print(f"warning: --max-length {max_length} leaves no target token in {lost} of {len(labels)} "
                  f"{split} rows ({100 * lost / len(labels):.0f}%); they add nothing to the loss",
                  file=sys.stderr)


def split_template(template: str, separator: str) -> str | None:
    """The prompt part of the template (up to and including the separator), or None."""
    i = template.find(separator)
    return None if i < 0 else template[: i + len(separator)]


def render(template: str, batch: dict) -> list[str]:
    """Apply `template` to every row of a batched `datasets` dict of columns."""
    cols = list(batch)
    return [template.format(**dict(zip(cols, vals))) for vals in zip(*batch.values())]


def tokenize_causal(ds: datasets.Dataset, tokenizer, template: str, separator: str,
                    completion_only: bool, max_length: int) -> datasets.Dataset:
    """Rows -> {input_ids, labels}: text = template(row) + eos, truncated to max_length tokens.

    With completion_only, labels are -100 on every token that lies entirely inside the prompt
    (found by character offsets, so BPE merges across the separator are handled).
    """
    prompt_tpl = split_template(template, separator)
    eos = tokenizer.eos_token or ""

    def fn(batch):
        texts = render(template, batch)
        enc = tokenizer([t + eos for t in texts], truncation=True, max_length=max_length,
                        return_offsets_mapping=completion_only)
        labels = [list(ids) for ids in enc["input_ids"]]
        if completion_only:
            prompts = render(prompt_tpl, batch)
            for lab, offs, prompt in zip(labels, enc["offset_mapping"], prompts):
                cut = len(prompt)
                for j, (s, e) in enumerate(offs):
                    # special tokens have (0, 0) offsets; bos belongs to the prompt
                    if e <= cut:
                        lab[j] = -100
        return {"input_ids": enc["input_ids"], "labels": labels}

    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc="tokenize")


def tokenize_seq2seq(ds: datasets.Dataset, tokenizer, template: str, separator: str,
                     max_length: int) -> datasets.Dataset:
    """Rows -> {input_ids: prompt tokens, labels: completion tokens} for encoder-decoder models."""
    prompt_tpl = split_template(template, separator)
    if prompt_tpl is None:
        raise TrainError(f"a seq2seq model needs --completion-separator {separator!r} in "
                         f"--text-template {template!r} to split input from target")

    def fn(batch):
        prompts = render(prompt_tpl, batch)
        targets = [t[len(p):] for t, p in zip(render(template, batch), prompts)]
        src = tokenizer(prompts, truncation=True, max_length=max_length)
        tgt = tokenizer(text_target=targets, truncation=True, max_length=max_length)
        return {"input_ids": src["input_ids"], "labels": tgt["input_ids"]}

    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc="tokenize")


def classification_text(template: str, separator: str) -> str:
    """The text a classifier reads: the template up to the completion separator (its prompt part,
    so the default "{quote} ->: {tags}" gives "{quote}": the tags would give the class away), or
    the whole template when the separator does not occur in it."""
    i = template.find(separator) if separator else -1
    return template if i < 0 else template[:i]


def class_ids(dsd: datasets.DatasetDict, column: str, name: str) -> dict:
    """{class value: id} over every split, values sorted (strings or integers); TrainError when the
    column is missing, empty in a row, not one scalar per row, or holds fewer than two classes."""
    values = set()
    for split, ds in dsd.items():
        if column not in ds.column_names:
            raise TrainError(f"--label-column {column!r} is not a column of {name}; its columns are: "
                             f"{', '.join(ds.column_names)}")
        for i, v in enumerate(ds[column]):
            if v is None or isinstance(v, (list, dict, float)):
                what = "has no value" if v is None else f"holds {type(v).__name__} {v!r}"
                raise TrainError(f"row {i + 1} of the {split} split of {name} {what} in --label-column "
                                 f"{column!r}; each row needs one class (a string or an integer)")
            values.add(v)
    if len(values) < 2:
        raise TrainError(f"--label-column {column!r} of {name} holds {len(values)} class(es) "
                         f"({sorted(values, key=str)}); classification needs at least two")
    if len({type(v) for v in values}) > 1:
        raise TrainError(f"--label-column {column!r} of {name} mixes strings and numbers; use one kind")
    return {v: i for i, v in enumerate(sorted(values))}


def tokenize_classification(ds: datasets.Dataset, tokenizer, template: str, label_column: str,
                            classes: dict, max_length: int) -> datasets.Dataset:
    """Rows -> {input_ids: text tokens (truncated to max_length), labels: the class id (an int)}."""

    def fn(batch):
        enc = tokenizer(render(template, batch), truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "labels": [classes[v] for v in batch[label_column]]}

    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc="tokenize")


def target_count(labels: torch.Tensor, shift: int) -> torch.Tensor:
    """What one batch's loss averages over: target tokens of labels [B, T] (position >= shift, not
    -100), or the rows of class labels [B] (sequence classification)."""
    return labels.new_tensor(labels.numel()) if labels.dim() == 1 else (labels[:, shift:] != -100).sum()


def pack(ds: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Concatenate all examples and cut into max_length blocks (the tail shorter than a block is
    dropped). Attention still spans example boundaries, as in HF's run_clm example."""

    def fn(batch):
        ids = [t for seq in batch["input_ids"] for t in seq]
        labs = [t for seq in batch["labels"] for t in seq]
        n = (len(ids) // max_length) * max_length
        return {"input_ids": [ids[i:i + max_length] for i in range(0, n, max_length)],
                "labels": [labs[i:i + max_length] for i in range(0, n, max_length)]}

    return ds.map(fn, batched=True, batch_size=1000, desc="pack")


class Collator:
    """Right-pad a list of {input_ids, labels} to the longest; labels -100 on padding. Class
    labels (one int per row, sequence classification) become labels [B]."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        classes = isinstance(rows[0]["labels"], int)
        n = max(len(r["input_ids"]) for r in rows)
        m = 0 if classes else max(len(r["labels"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)  # [B, T]
        att = torch.zeros((len(rows), n), dtype=torch.long)  # [B, T]
        lab = torch.full((len(rows), m), -100, dtype=torch.long)  # [B, T'] (T' = T for causal)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            att[i, : len(r["input_ids"])] = 1
            if not classes:
                lab[i, : len(r["labels"])] = torch.tensor(r["labels"])
        if classes:
            lab = torch.tensor([r["labels"] for r in rows])  # [B] class ids
        return {"input_ids": ids, "attention_mask": att, "labels": lab}


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation fixed by (seed, epoch), trimmed to a multiple of `multiple` indices.

    Trimming makes every optimizer step see a full global batch (micro-batch x processes x
    accumulation), so 4x1 accumulation, 1x4 batches and 2 processes sum the same examples.
    `set_epoch` is called by Accelerate's data loader; resuming reproduces the order exactly.
    """

    def __init__(self, n: int, seed: int, multiple: int):
        self.n, self.seed, self.multiple, self.epoch = n, seed, multiple, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        return iter(perm[: len(self)])

    def __len__(self) -> int:
        return (self.n // self.multiple) * self.multiple
