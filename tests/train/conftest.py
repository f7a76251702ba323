"""Fixtures for train tests: a tiny Llama (tests/tiny_models.py) saved with the built-in char
tokenizer, a small slice of the bundled tagger data, and a fast base TrainConfig."""
from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import save_tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """tests/tiny_models' llama (hidden 64, vocab 128) + the char tokenizer (101 ids < 128)."""
    from train.models import build_char_tokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    save_tiny("llama", path)
    build_char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    """48 rows of the bundled dataset (same shape: quote, author, tags, label)."""
    rows = (ROOT / "train" / "assets" / "tagger.jsonl").read_text().splitlines()[:48]
    path = tmp_path_factory.mktemp("data") / "tagger48.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def base_cfg(tiny_dir, data_file, tmp_path):
    """A run small enough for a few seconds on one core: 4 steps of 4 x 64 tokens."""
    from train import TrainConfig

    def make(**kw):
        cfg = dict(model=str(tiny_dir), dataset=str(data_file), output_dir=str(tmp_path / "out"),
                   max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=16,
                   max_length=64, learning_rate=1e-2, warmup_steps=1, logging_steps=1, eval_steps=0,
                   save_steps=0, tag_eval_samples=4, num_sample_generations=1, max_new_tokens=6,
                   eval_split_size=0.25, cpu_threads=1, report_to="none", seed=0)
        cfg.update(kw)
        return TrainConfig(**cfg)

    return make


# Outputs-only settings for the reliability tests: no generation, so a run is ~0.3 s.
QUIET = dict(tag_eval_samples=0, num_sample_generations=0)


@pytest.fixture(scope="session")
def finished_run(tiny_dir, data_file, tmp_path_factory) -> Path:
    """One complete run to copy from: 2 steps, checkpoint-1 and -2, adapter/, merged/, log.jsonl,
    loss.png. Tests copy it (`earlier_run`) instead of training again."""
    from train import TrainConfig, run

    out = tmp_path_factory.mktemp("finished") / "out"
    run(TrainConfig(model=str(tiny_dir), dataset=str(data_file), output_dir=str(out), max_steps=2,
                    save_steps=1, merge=True, per_device_train_batch_size=4, per_device_eval_batch_size=16,
                    max_length=64, learning_rate=1e-2, warmup_steps=1, logging_steps=1, eval_steps=0,
                    eval_split_size=0.25, cpu_threads=1, report_to="none", seed=0, **QUIET))
    return out


@pytest.fixture
def earlier_run(finished_run, tmp_path) -> Path:
    """A private copy of `finished_run` at tmp_path/out (where `base_cfg` writes by default)."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): equal snapshots mean nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def unchanged():
    """unchanged(folder) -> a check that asserts no file under it changed since the call."""
    def take(folder: Path):
        before = snapshot(folder)

        def check():
            after = snapshot(folder)
            assert sorted(after) == sorted(before), (sorted(set(after) ^ set(before)))
            assert all(after[k] == before[k] for k in before), [k for k in before if after[k] != before[k]]
        return check
    return take


@pytest.fixture
def fast_cfg(base_cfg):
    """base_cfg without generation (tag score, samples): what the reliability tests need."""
    return lambda **kw: base_cfg(**{**QUIET, **kw})


@pytest.fixture
def no_model_load(monkeypatch):
    """Bad input must fail before the model is loaded."""
    import train.loop as loop

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loop, "load_base_model", boom)
