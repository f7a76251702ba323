"""Rows, aligned terminal tables and JSON files for the compare reports."""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch


@dataclass
class Row:
    """One equivalence check: ours against peft on one quantity.

    max_abs: max |ours - peft| over the compared tensors; rel: max_abs / max |peft| (scale-free,
    what `tol` bounds). `ok` is the verdict; `where` names the worst tensor/layer/step; `reason`
    says why the tolerance is what it is.
    """

    check: str
    max_abs: float
    rel: float
    tol: float
    ok: bool
    where: str = ""
    reason: str = ""
    detail: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "PASS" if self.ok else "FAIL"


def diff(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |ours - ref|, that divided by max |ref|), computed in float64.

    Shapes must agree: a shape mismatch is itself a failure the caller reports, never broadcast away.
    """
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: ours {tuple(ours.shape)} vs peft {tuple(ref.shape)}")
    a, b = ours.detach().double().cpu(), ref.detach().double().cpu()
    max_abs = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    if not math.isfinite(max_abs):
        return math.inf, math.inf
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return max_abs, rel


def fmt_num(x: Any) -> str:
    """Short human form for table cells: floats in 3 significant digits, ints with separators."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf"
        if x == 0:
            return "0"
        if 1e-3 <= abs(x) < 1e5:
            return f"{x:.4g}"
        return f"{x:.2e}"
    return "" if x is None else str(x)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns aligned to their widest cell; numbers right-aligned, text left-aligned."""
    raw = [list(r) for r in rows]
    cells = [[fmt_num(c) for c in r] for r in raw]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    numeric = [all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool)
                   for r in raw if r[i] is not None and r[i] != "") for i in range(len(headers))]

    def line(vals):
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w)
                         for i, (v, w) in enumerate(zip(vals, widths))).rstrip()

    out = [line(list(headers)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # JSON has no inf/nan; keep them readable instead of invalid
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    return x


def row_dict(row: Row) -> dict:
    d = asdict(row)
    d["verdict"] = row.verdict
    return d


def write_json(path: os.PathLike | str, obj: Any) -> Path:
    """Write `obj` as JSON to `path` atomically (temp file in the same dir, then rename)."""
    return write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def write_text(path: os.PathLike | str, text: str) -> Path:
    """Atomic text write: nothing half-written is ever left under `path`."""
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: os.PathLike | str, data: bytes) -> Path:
    """Atomic write: the bytes go to a temporary file beside `path` (same filesystem), are flushed
    to disk, and the file is renamed over `path` in one step. A crash, a full disk or Ctrl-C leaves
    either the old file or the new one, never a mix; the temporary file is removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable_file(path: os.PathLike | str, flag: str) -> None:
    """Raise CompareError unless a file can be written at `path` (checked before any work): it is
    not a folder, and its nearest existing parent is a writable folder."""
    from .models import CompareError

    path = Path(path)
    if path.is_dir():
        raise CompareError(f"{flag} {path} is a directory; pass a file path")
    _check_writable_parent(path.parent, flag, path)


def check_writable_dir(path: os.PathLike | str, flag: str) -> None:
    """Raise CompareError unless `path` is (or can be created as) a writable folder."""
    from .models import CompareError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CompareError(f"{flag} {path} exists and is not a directory; pass a directory path")
    _check_writable_parent(path, flag, path)


def _check_writable_parent(folder: Path, flag: str, shown: Path) -> None:
    from train.outputs import unwritable_reason

    from .models import CompareError

    why = unwritable_reason(folder)
    if why:
        raise CompareError(f"{flag} {shown} {why}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def jsonable(x: Any, default: Optional[Any] = None) -> Any:
    """Public helper: `x` with tensors' dtypes, paths and non-finite floats made JSON-safe."""
    return _jsonable(x if x is not None else default)
