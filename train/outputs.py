"""The output folder: what an earlier run left there, the guard that keeps it, folder replaces that
never show a partial folder, and the clean-up of what an interrupted run left.

What a run writes into <output-dir> (RUN_FILES, RUN_DIRS, checkpoint-<step>/):
    log.jsonl  loss.png  checkpoint-<step>/  adapter/  merged/  lorafuse/ (TensorBoard events)
Names that only exist while something is being written:
    .tmp-<name>     a file or folder being written; complete only once renamed to <name>
    .old-<name>     a folder being replaced (the fallback where the kernel cannot swap two folders)
    .previous-run/  an earlier run set aside by --overwrite-output-dir until the new run is valid
`recover` resolves each of them at the start of the next run, so a complete folder is always found
under its real name, and a run killed half-way through replacing an earlier one never costs it.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .errors import TrainError

RUN_FILES = ("log.jsonl", "loss.png")
TRACKER_DIR = "lorafuse"  # Accelerate's TensorBoard tracker writes <output-dir>/<project name>/
RUN_DIRS = ("adapter", "merged", TRACKER_DIR)
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
PREVIOUS = ".previous-run"
COMPLETE = ".complete"  # inside PREVIOUS: every entry of the earlier run was moved in
# Test hook, "<folder name>:<phase>:<seconds>": when replacing that folder reaches that phase (ready,
# aside, swapped), print it to stderr and sleep, so a test can SIGKILL the run right there
# (tests/train/test_train_faults.py).
PAUSE_ENV = "LORAFUSE_TEST_REPLACE_PAUSE"


def unwritable_reason(folder: Path) -> str | None:
    """Why `folder` cannot be written or created (its nearest existing ancestor is a file, or a
    temp file cannot be made there), or None when it can. Checked before any work; writes nothing
    that stays."""
    anc = folder
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        return f"cannot be created: {anc} is a file"
    try:
        with tempfile.TemporaryFile(dir=anc):
            pass
    except OSError as e:
        return f"is not writable ({e.strerror} in {anc})"
    return None


def run_entries(out: Path) -> list[Path]:
    """What an earlier run left in `out` (its files, folders and checkpoints): checkpoints by step,
    then the rest by name."""
    if not out.is_dir():
        return []
    return sorted((p for p in out.iterdir()
                   if p.name in RUN_FILES or p.name in RUN_DIRS or CHECKPOINT_RE.fullmatch(p.name)),
                  key=lambda p: (not CHECKPOINT_RE.fullmatch(p.name), _step(p), p.name))


def describe(entries: list[Path]) -> str:
    """'checkpoint-2, checkpoint-4, adapter/, log.jsonl' (folders with a slash)."""
    return ", ".join(p.name + ("/" if p.is_dir() and not CHECKPOINT_RE.fullmatch(p.name) else "")
                     for p in entries)


def _step(p: Path) -> int:
    m = CHECKPOINT_RE.fullmatch(p.name)
    return int(m.group(1)) if m else -1


def check_output_dir(out: Path, overwrite: bool, resume: Path | None) -> None:
    """Refuse (TrainError) a run into a folder that holds an earlier run, unless it resumes a
    checkpoint of that folder or --overwrite-output-dir asks to replace it. Writes nothing."""
    entries = run_entries(out) or run_entries(out / PREVIOUS)  # a set-aside run comes back first
    if not entries:
        return
    inside = resume is not None and resume.resolve().parent == out.resolve()
    if inside:
        later = [p for p in entries if _step(p) > _step(resume)]
        if later and not overwrite:
            raise TrainError(
                f"--resume-from-checkpoint {resume} is not the newest checkpoint of {out} "
                f"({describe(later)} come after it) and continuing from it would replace them; resume "
                f"from latest, or pass --overwrite-output-dir to continue from {resume.name} anyway")
        return
    if overwrite:
        return
    raise TrainError(
        f"--output-dir {out} holds an earlier run ({describe(entries)}); continue it with "
        f"--resume-from-checkpoint latest, choose another --output-dir, or pass --overwrite-output-dir "
        f"to replace it (the earlier run is kept until the new one writes its first checkpoint or "
        f"finishes)")


def recover(out: Path, say=None) -> None:
    """Resolve what an interrupted run left in `out` (see the module docstring): an earlier run set
    aside by an overwrite that never became valid is restored, a folder replace cut short keeps
    the complete folder, unfinished temporaries are deleted. Main process only."""
    if not out.is_dir():
        return
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        _recover(out, say)
    except OSError as e:  # e.g. a read-only folder: nothing is lost, but the run cannot start
        kept = (f"; the earlier run set aside is still complete in {out / PREVIOUS}"
                if (out / PREVIOUS).is_dir() else "")
        raise TrainError(f"--output-dir {out}: cannot resolve what an interrupted run left there "
                         f"({e.strerror}: {e.filename}){kept}; fix the folder by hand or choose another "
                         f"--output-dir") from None


def _recover(out: Path, say) -> None:
    if (out / PREVIOUS).is_dir():
        restore_previous(out)
        say(f"note: restored the earlier run in {out} that an interrupted --overwrite-output-dir run "
            f"had set aside")
    for p in sorted(out.iterdir()):
        if p.name.startswith(".old-"):
            final = out / p.name[len(".old-"):]
            if final.exists():
                _remove(p)  # the swap had finished; only the delete of the old folder was cut short
            else:
                os.rename(p, final)  # killed between the two renames: the old folder goes back
    for p in sorted(out.iterdir()):
        if p.name.startswith(".tmp-") or (p.name.startswith(".") and ".tmp-" in p.name):
            _remove(p)  # incomplete by construction (or the old half of a finished swap)


def set_aside(out: Path) -> None:
    """--overwrite-output-dir: move the earlier run's entries into <out>/.previous-run/, where they
    stay until `drop_previous` (this run is valid) or `restore_previous` (it failed)."""
    entries = run_entries(out)
    if not entries:
        return
    prev = out / PREVIOUS
    prev.mkdir()
    for p in entries:
        os.rename(p, prev / p.name)
    (prev / COMPLETE).write_text("")  # from here on, top-level run entries belong to the new run


def restore_previous(out: Path) -> None:
    """Undo `set_aside`: delete what the new (failed) run wrote, move the earlier run back."""
    prev = out / PREVIOUS
    if not prev.is_dir():
        return
    if (prev / COMPLETE).exists():  # else the move was cut short and nothing new was written yet
        for p in run_entries(out):
            _remove(p)
    for p in prev.iterdir():
        if p.name != COMPLETE:
            os.rename(p, out / p.name)
    _remove(prev)


def drop_previous(out: Path) -> None:
    """This run is valid (a checkpoint or its adapter is written): delete the set-aside earlier run.
    Renamed to a temporary name first, so a kill during the delete is finished by `recover`."""
    prev = out / PREVIOUS
    if prev.is_dir():
        doomed = out / f".tmp-{PREVIOUS[1:]}"
        os.rename(prev, doomed)
        _remove(doomed)


class Replacement:
    """--overwrite-output-dir's promise, as a context manager around everything a run writes.

    On enter (active: an overwrite on the main process) the earlier run is set aside; `commit()`,
    called once this run is valid (its first checkpoint, or its adapter, is written), deletes it.
    Leaving the block with an exception before that brings the earlier run back.
    """

    def __init__(self, out: Path, active: bool):
        self.out, self.active, self.committed = out, active, False

    def __enter__(self) -> "Replacement":
        if self.active:
            set_aside(self.out)
        return self

    def commit(self) -> None:
        if self.active and not self.committed:
            drop_previous(self.out)
        self.committed = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.active and not self.committed and (self.out / PREVIOUS).is_dir():
            restore_previous(self.out)
            print(f"note: this run did not finish; the earlier run in {self.out} was restored",
                  file=sys.stderr, flush=True)


def write_folder(final: Path, write) -> Path:
    """Build a folder with `write(tmp_dir)` under a temporary name, then `replace_dir` it in."""
    tmp = final.with_name(".tmp-" + final.name)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)
    return final


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete folder `tmp` at `final` (same parent) so that `final` is at every moment
    either the old complete folder or the new one.

    Linux swaps the two names in one step (renameat2 RENAME_EXCHANGE), then the old folder, now
    under `tmp`'s name, is deleted. Elsewhere: old -> .old-<name>, tmp -> final, delete old; a kill
    between the two renames leaves .old-<name>, which `recover` renames back.
    """
    _pause(final, "ready")
    if not final.exists():
        os.rename(tmp, final)
        _pause(final, "swapped")
        return
    if _exchange(tmp, final):
        _pause(final, "swapped")
        _remove(tmp)
        return
    old = final.with_name(".old-" + final.name)
    if old.exists():
        _remove(old)
    os.rename(final, old)
    _pause(final, "aside")
    os.rename(tmp, final)
    _pause(final, "swapped")
    _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc < 2.28, musl
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem without the flag
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(p: Path) -> None:
    """Delete a file or folder; a failure (a read-only folder) is reported, never fatal: the name is
    a temporary one that the next run's `recover` tries again."""
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    except OSError as e:
        print(f"warning: could not delete {p} ({e.strerror}); delete it by hand", file=sys.stderr)


def _pause(final: Path, phase: str) -> None:
    name, _, rest = os.environ.get(PAUSE_ENV, "").partition(":")
    at, _, secs = rest.partition(":")
    if secs and (name, at) == (final.name, phase):
        print(f"[replace] {final.name} {phase}", file=sys.stderr, flush=True)
        time.sleep(float(secs))


def emergency_dir(out: Path, step: int) -> Path:
    """A fresh folder outside <output-dir> (the system temp dir, often another filesystem) for the
    weights of a run whose outputs could not be written."""
    return Path(tempfile.mkdtemp(prefix=f"lorafuse-{out.resolve().name}-step{step}-"))
