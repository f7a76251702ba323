"""Every option's valid values come from its definition (train.config): the check, its message and
--help are tested here for every field, from the field's own bounds and choices, so a new field is
covered the day it is declared."""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import TrainConfig, check_config, fields, flag, rule

ROOT = Path(__file__).resolve().parents[2]


def _outside(f: dataclasses.Field) -> list[tuple]:
    """(value, message names the rule) pairs just outside each declared bound of `f`, plus NaN/inf
    for floats, an unknown choice, an empty required string and a wrong type."""
    b, t = f.metadata["bounds"], f.type

    def step(v):  # the next representable-enough value beyond v
        return 1 if t == "int" else max(1e-6, abs(v) * 1e-9)

    vals = []
    if b.gt is not None:
        vals.append(b.gt)
    if b.ge is not None:
        vals.append(b.ge - step(b.ge))
    if b.lt is not None:
        vals.append(b.lt)
    if b.le is not None:
        vals.append(b.le + step(b.le))
    vals = [(type(f.default)(v), True) for v in vals]
    if t == "float":
        vals += [(math.nan, True), (math.inf, True), (-math.inf, True)]
    if f.metadata["choices"]:
        vals.append(("no-such-choice" if t == "str" else max(f.metadata["choices"]) + 1, True))
    if f.metadata["nonempty"]:
        vals += [("", False), ("  ", False)]
    vals.append((True if t in ("int", "float") else 3 if t == "str" else "yes", False))  # wrong type
    return vals


def _inside(f: dataclasses.Field) -> list:
    """Values at the edge of each bound that must be accepted (ge/le themselves, gt/lt + a step)."""
    b, t = f.metadata["bounds"], f.type
    step = 1 if t == "int" else 1e-6
    vals = [f.default]
    vals += [b.ge] if b.ge is not None else []
    vals += [b.le] if b.le is not None else []
    vals += [b.gt + step] if b.gt is not None else []
    vals += [b.lt - step] if b.lt is not None else []
    return [type(f.default)(v) for v in vals]


CASES = [(name, v, named) for name, f in fields().items() for v, named in _outside(f)]


@pytest.mark.parametrize("name, value, names_rule", CASES, ids=[f"{n}={v!r}" for n, v, _ in CASES])
def test_each_value_outside_a_fields_definition_is_refused_with_its_rule(name, value, names_rule):
    from train import TrainError

    f = fields()[name]
    with pytest.raises(TrainError) as info:
        check_config(dataclasses.replace(TrainConfig(), **{name: value}))
    msg = str(info.value)
    assert msg.startswith(f"{flag(name)} must ") and f"(got {value!r})" in msg, msg
    if names_rule:
        assert f"must be {rule(f)} (got" in msg, msg  # the rule, as the definition states it


@pytest.mark.parametrize("name", [n for n, f in fields().items() if f.type in ("int", "float")])
def test_values_at_the_edge_of_a_bound_are_accepted(name):
    for v in _inside(fields()[name]):
        check_config(dataclasses.replace(TrainConfig(), **{name: v}))


def test_help_shows_each_fields_rule():
    text = " ".join(__import__("train.config", fromlist=["x"]).build_parser().format_help().split())
    for name, f in fields().items():
        if f.type in ("int", "float") and rule(f) and not f.metadata["choices"]:  # choices: argparse's {a,b}
            assert f"must be {rule(f)}" in text, name
    assert "must be > 0 (default: 16)" in text  # --r


@pytest.mark.parametrize("kw, match", [
    (dict(learning_rate=math.nan), r"--learning-rate must be finite and in \(0, 3.40282e\+38\] \(got nan\)"),
    (dict(learning_rate=-1e-3), r"--learning-rate must be finite and in \(0, .*\(got -0.001\)"),
    (dict(learning_rate=math.inf), r"--learning-rate must be finite"),
    (dict(learning_rate=1e39), r"--learning-rate must be finite and in \(0, 3.40282e\+38\] \(got 1e\+39\)"),
    (dict(lora_alpha=math.nan), r"--lora-alpha must be finite and > 0 \(got nan\)"),
    (dict(logging_steps=0), r"--logging-steps must be > 0 \(got 0\)"),
    (dict(seed=-1), r"--seed must be in \[0, 4294967295\] \(got -1\)"),
    (dict(max_new_tokens=0), r"--max-new-tokens must be > 0 \(got 0\)"),
    (dict(max_steps=0, num_train_epochs=0.0), r"set --max-steps > 0 or --num-train-epochs > 0"),
], ids=["lr-nan", "lr-negative", "lr-inf", "lr-beyond-fp32", "alpha-nan", "logging-0", "seed-negative", "new-tokens-0", "no-length"])
def test_issue_cases_fail_before_any_work(fast_cfg, no_model_load, kw, match):
    from train import TrainError, run

    cfg = fast_cfg(**kw)
    with pytest.raises(TrainError, match=match):
        run(cfg)
    assert not Path(cfg.output_dir).exists()


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "train", "--learning-rate", "nan", "--output-dir",
                           str(tmp_path / "o")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --learning-rate must be finite and in (0, 3.40282e+38] "
                                                "(got nan)"]
    assert not (tmp_path / "o").exists()


def test_resume_rules_list_every_training_field_that_differs():
    from train.config import RESUME_MAY_CHANGE, resume_mismatches

    old = TrainConfig().to_dict()
    new = dataclasses.replace(TrainConfig(), r=8, lora_alpha=64.0, logging_steps=5, max_steps=900)
    assert resume_mismatches(old, new) == ["r: 16 -> 8", "lora_alpha: 32.0 -> 64.0"]
    # A field the checkpoint's config lacks (written before it existed) counts as its default.
    del old["packing"]
    assert resume_mismatches(old, TrainConfig()) == []
    assert resume_mismatches(old, dataclasses.replace(TrainConfig(), packing=True)) == ["packing: False -> True"]
    assert RESUME_MAY_CHANGE <= set(fields())  # no stale names in the allow-list
