"""The output folder keeps earlier work: a second run into it is refused, --overwrite-output-dir
keeps the earlier run until the new one is valid, folder replaces are swaps, leftovers of an
interrupted run are resolved, and a stale merged/ is never reported as this run's."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest


@pytest.mark.parametrize("keep", [["checkpoint-1", "checkpoint-2"], ["adapter"], ["log.jsonl"], ["merged"]],
                         ids=["checkpoints", "adapter", "log", "merged"])
def test_new_run_into_an_earlier_run_is_refused_before_any_work(earlier_run, fast_cfg, no_model_load,
                                                                unchanged, keep):
    from train import TrainError, run

    for p in earlier_run.iterdir():  # each kind of earlier output alone is protected
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    same = unchanged(earlier_run)
    with pytest.raises(TrainError) as info:
        run(fast_cfg())
    msg = str(info.value)
    assert f"--output-dir {earlier_run} holds an earlier run (" in msg and "\n" not in msg
    for name in keep:
        assert name in msg
    for way in ("--resume-from-checkpoint latest", "another --output-dir", "--overwrite-output-dir"):
        assert way in msg
    same()


def test_unrelated_files_do_not_make_a_folder_an_earlier_run(fast_cfg, tmp_path):
    from train import run

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = run(fast_cfg(max_steps=1))
    assert (out / "notes.txt").read_text() == "mine" and (res.adapter_dir / "adapter_config.json").is_file()


@pytest.mark.parametrize("exc", [ZeroDivisionError("boom"), PermissionError(errno.EACCES, "Permission denied"),
                                 OSError(errno.ENOSPC, "No space left on device")],
                         ids=["ZeroDivisionError", "PermissionError", "ENOSPC"])
def test_overwrite_that_fails_before_its_first_checkpoint_restores_the_earlier_run(
        earlier_run, fast_cfg, unchanged, monkeypatch, capsys, exc):
    import train.loop as loop
    from train import TrainFailed, run

    same = unchanged(earlier_run)
    real, calls = loop.token_losses, {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # inside step 2, after log.jsonl was written for the new run
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(loop, "token_losses", failing)
    with pytest.raises((type(exc), TrainFailed)):
        run(fast_cfg(overwrite_output_dir=True, save_steps=3))
    same()  # log.jsonl, checkpoints, adapter/, merged/: byte for byte the earlier run's
    assert not (earlier_run / ".previous-run").exists()
    assert "the earlier run in" in capsys.readouterr().err


def test_overwrite_replaces_the_earlier_run_once_the_new_one_has_a_checkpoint(earlier_run, fast_cfg,
                                                                              monkeypatch):
    import train.loop as loop
    from train import TrainInterrupted, run

    old_adapter = (earlier_run / "adapter" / "adapter_model.safetensors").read_bytes()
    real, calls = loop.token_losses, {"n": 0}

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # Ctrl-C inside step 4, after checkpoint-3 of the new run
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "token_losses", interrupting)
    with pytest.raises(TrainInterrupted):
        run(fast_cfg(overwrite_output_dir=True, save_steps=3, max_steps=5))
    # The new run was valid (checkpoint-3): the earlier one is gone, the new one resumable.
    assert sorted(p.name for p in earlier_run.iterdir()) == ["checkpoint-3", "log.jsonl"]
    monkeypatch.setattr(loop, "token_losses", real)
    res = run(fast_cfg(resume_from_checkpoint="latest", save_steps=3, max_steps=5))
    assert res.steps == 5 and (earlier_run / "adapter" / "adapter_model.safetensors").read_bytes() != old_adapter
    assert sorted(p.name for p in earlier_run.iterdir()) == ["adapter", "checkpoint-3", "checkpoint-5",
                                                            "log.jsonl", "loss.png"]


def test_overwrite_killed_before_it_was_valid_is_undone_by_the_next_run(earlier_run, fast_cfg, unchanged):
    """A SIGKILL leaves the earlier run in .previous-run/ beside the new run's first files; the next
    run (any run, even one with bad input) puts the earlier run back first."""
    from train import TrainError, run
    from train.outputs import set_aside

    same = unchanged(earlier_run)
    set_aside(earlier_run)
    (earlier_run / "log.jsonl").write_text('{"step": 0}\n')  # what the killed run had written
    with pytest.raises(TrainError, match="holds an earlier run"):
        run(fast_cfg())
    same()


def test_resume_without_merge_never_reports_the_stale_merged_folder(earlier_run, fast_cfg, capsys):
    from train import run

    res = run(fast_cfg(resume_from_checkpoint="latest", max_steps=3, save_steps=1))
    printed = capsys.readouterr().out
    assert res.merged_dir is None
    wrote = [ln for ln in printed.splitlines() if ln.startswith("wrote ")]
    assert wrote and "merged" not in wrote[0]
    assert "merged/ is from an earlier stage of this run" in printed


def test_leftovers_of_an_interrupted_run_are_cleaned_up(earlier_run, fast_cfg):
    from train import run

    (earlier_run / ".tmp-checkpoint-3").mkdir()
    (earlier_run / ".tmp-checkpoint-3" / "optimizer.bin").write_bytes(b"half")
    (earlier_run / "..tmp-adapter.tmp-0123456789ab").mkdir()  # lora_core's own temporary name
    (earlier_run / ".tmp-log.jsonl").write_text("half")
    run(fast_cfg(resume_from_checkpoint="latest", max_steps=3, save_steps=1))
    assert not [p.name for p in earlier_run.iterdir() if p.name.startswith(".")]


def _adapter(tmp: Path, tag: str) -> Path:
    tmp.mkdir()
    (tmp / "adapter_model.safetensors").write_text(tag)
    (tmp / "adapter_config.json").write_text(tag)
    return tmp


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_replace_dir_swaps_complete_folders(tmp_path, monkeypatch, exchange):
    from train import outputs

    if not exchange:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    final = _adapter(tmp_path / "adapter", "old")
    outputs.replace_dir(_adapter(tmp_path / ".tmp-adapter", "new"), final)
    assert (final / "adapter_config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_exchange_is_atomic_on_this_machine(tmp_path):
    """renameat2 RENAME_EXCHANGE works here (else replace_dir falls back to rename-aside, and the
    kill test below checks that path instead)."""
    from train import outputs

    a, b = _adapter(tmp_path / "a", "A"), _adapter(tmp_path / "b", "B")
    if not outputs._exchange(a, b):
        pytest.skip("this filesystem cannot swap two folders in one step")
    assert (a / "adapter_config.json").read_text() == "B" and (b / "adapter_config.json").read_text() == "A"


@pytest.mark.parametrize("cut", ["aside", "swapped"])
def test_recover_finds_a_complete_folder_wherever_rename_aside_was_cut(tmp_path, monkeypatch, cut):
    """The fallback replace, interrupted between its steps: after recover(), adapter/ is the old
    folder (cut after moving it aside) or the new one (cut after renaming it in)."""
    from train import outputs

    class Killed(BaseException):
        pass

    def pause(final, phase):
        if phase == cut:
            raise Killed

    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    monkeypatch.setattr(outputs, "_pause", pause)
    final = _adapter(tmp_path / "adapter", "old")
    with pytest.raises(Killed):
        outputs.replace_dir(_adapter(tmp_path / ".tmp-adapter", "new"), final)
    outputs.recover(tmp_path, say=lambda m: None)
    assert (final / "adapter_config.json").read_text() == ("old" if cut == "aside" else "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_read_only_old_adapter_is_still_replaced(earlier_run, fast_cfg, capsys):
    """A read-only adapter/ (chmod 555) does not stop the swap (a rename needs only the parent to
    be writable); the old copy that cannot be deleted is reported and left under a .tmp- name."""
    from train import run

    if os.geteuid() == 0:
        pytest.skip("root ignores file modes; the monkeypatched ENOSPC test covers write failures")
    adapter = earlier_run / "adapter"
    old = (adapter / "adapter_model.safetensors").read_bytes()
    for p in [*adapter.iterdir(), adapter]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        run(fast_cfg(resume_from_checkpoint="latest", max_steps=3, save_steps=1))
        assert (adapter / "adapter_model.safetensors").read_bytes() != old
        assert "could not delete" in capsys.readouterr().err
    finally:
        for p in earlier_run.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_a_recovery_that_cannot_finish_stops_the_run_with_the_earlier_run_safe(earlier_run, fast_cfg,
                                                                                monkeypatch, unchanged):
    """If the set-aside run cannot be moved back (here: every rename fails, as in a folder turned
    read-only), the run stops in one line before any work and .previous-run/ stays complete."""
    from train import TrainError, outputs, run

    outputs.set_aside(earlier_run)
    same = unchanged(earlier_run / ".previous-run")

    def refused(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(src))

    monkeypatch.setattr(outputs.os, "rename", refused)
    with pytest.raises(TrainError, match=r"cannot resolve what an interrupted run left there \(Permission "
                                         r"denied: .*still complete in .*\.previous-run"):
        run(fast_cfg())
    same()
