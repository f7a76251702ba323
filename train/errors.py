"""How a run ends when it does not succeed; `python -m train` maps each to its exit code.

    TrainError        exit 2    bad input, found before any work; nothing was written
    TrainFailed       exit 1    the run started but could not finish (a diverged loss, a full disk);
                                the message says where this run's last good weights are kept
    TrainInterrupted  exit 130  Ctrl-C; the last checkpoint is intact

No heavy imports here: `python -m train --help` and the config checks stay instant.
"""
from __future__ import annotations

from pathlib import Path


class TrainError(ValueError):
    """Bad input found before any work: the message names the problem and the fix (one line)."""


class TrainFailed(RuntimeError):
    """The run started but did not finish. `.kept`: where this run's last good weights are (a
    checkpoint or adapter folder), or None when nothing of this run could be kept."""

    def __init__(self, message: str, kept: Path | None = None):
        super().__init__(message)
        self.kept = kept


class TrainDiverged(TrainFailed):
    """The loss, the gradient norm or the updated weights became non-finite at `.step`; nothing
    from that step on was written (no NaN weights anywhere)."""

    def __init__(self, step: int, what: str, kept: Path | None):
        where = (f"the last good checkpoint {kept} stays the latest" if kept
                 else "no checkpoint was written before it")
        super().__init__(f"training diverged at step {step}: {what}; stopped without saving any "
                         f"weights of this step ({where}); lower --learning-rate or check the data", kept)
        self.step, self.what = step, what


class TrainInterrupted(RuntimeError):
    """Ctrl-C during training; `.checkpoint` is the last complete checkpoint (or None)."""

    def __init__(self, step: int, checkpoint: Path | None, note: str = ""):
        where = (f"last checkpoint {checkpoint} is intact; continue with --resume-from-checkpoint latest"
                 if checkpoint else "no checkpoint was written yet")
        super().__init__(f"interrupted after step {step}; {where}{note}")
        self.step, self.checkpoint = step, checkpoint
