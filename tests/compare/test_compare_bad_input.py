"""Bad input: a clear one-line error and a non-zero exit, before any work."""
import pytest

from compare.__main__ import main


def test_model_that_cannot_load(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert main(["equivalence", "--model", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "cannot load model" in err and str(missing) in err


def test_triton_without_cuda_or_interpreter(monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so triton is available")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # explicitly off: compare must not turn it on
    assert main(["equivalence", "--backend", "triton"]) == 2
    err = capsys.readouterr().err
    assert "backend 'triton' needs a CUDA GPU" in err and "TRITON_INTERPRET=1" in err
    # --kernel, the old name of --backend: the same check, plus one note
    assert main(["equivalence", "--kernel", "triton"]) == 2
    err = capsys.readouterr().err
    assert "note: --kernel is deprecated: use --backend" in err and "backend 'triton' needs a CUDA GPU" in err


def test_bad_rank(capsys):
    assert main(["equivalence", "--r", "0"]) == 2
    assert "--r must be > 0 (got 0)" in capsys.readouterr().err


@pytest.mark.parametrize("grid, expect", [
    (["--grid", "rank=4,8"], "unknown grid key(s) ['rank']; valid TrainConfig fields:"),
    (["--grid", "quantization=none,nf5"], "must be one of none, nf4, fp4, int8"),
    (["--grid", "r=4,eight"], "r='eight': expected a value of type int"),
    (["--grid", "output_dir=a,b"], "cannot be swept"),
    (["--grid", "r"], "write KEY=V1,V2"),
])
def test_sweep_bad_grid(tmp_path, capsys, grid, expect):
    out = tmp_path / "sweep"
    assert main(["sweep", *grid, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert expect in err, err
    if "valid TrainConfig fields" in expect:
        assert "learning_rate" in err and "quantization" in err  # the valid keys are listed
    assert not out.exists()  # nothing run, nothing written


def test_target_modules_matching_nothing(capsys):
    assert main(["equivalence", "--target-modules", "no_such_layer"]) == 2
    err = capsys.readouterr().err
    assert "no_such_layer" in err and "q_proj" in err  # names what it found instead


def _bounded_flags():
    """(command, flag, value outside its declared range) for every numeric flag of every command,
    generated from the flags' own definitions (compare.__main__._num)."""
    from compare.__main__ import build_parser

    cases = []
    for command, sub in build_parser().commands.items():
        for act in sub._actions:
            b = getattr(act, "bounds", None)
            if b is None:
                continue
            flag = act.option_strings[0]
            outside = [v for v in (b.gt, None if b.ge is None else b.ge - 1, b.lt,
                                   None if b.le is None else b.le + 1) if v is not None]
            if act.type is float:
                outside += [float("nan"), float("inf")]
            cases += [(command, flag, act.type(v)) for v in outside]
    return cases


@pytest.mark.parametrize("command, flag, value", _bounded_flags())
def test_every_numeric_flag_is_checked_against_its_declared_range(monkeypatch, capsys, command, flag, value):
    import compare.ablation as ablation
    import compare.equivalence as equivalence
    import compare.speed as speed

    def boom(*a, **k):
        raise AssertionError("work started before the flags were checked")

    for mod, name in ((equivalence, "run_equivalence"), (speed, "run_speed"), (ablation, "sweep")):
        monkeypatch.setattr(mod, name, boom)
    extra = ["--grid", "r=4"] if command == "sweep" else []
    assert main([command, flag, str(value), *extra]) == 2
    err = capsys.readouterr().err
    assert f"error: {flag} must be " in err and f"(got {value})" in err, err


@pytest.mark.parametrize("where", ["dir", "under-a-file"])
def test_json_path_is_checked_before_the_work(tmp_path, monkeypatch, capsys, where):
    import compare.equivalence as equivalence

    monkeypatch.setattr(equivalence, "run_equivalence", lambda *a, **k: pytest.fail("ran before the check"))
    (tmp_path / "afile").write_text("x")
    path = tmp_path if where == "dir" else tmp_path / "afile" / "eq.json"
    assert main(["equivalence", "--json", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error: --json" in err and ("is a directory" in err or "is a file" in err), err


def test_sweep_out_that_is_a_file_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.setattr(train, "run", lambda cfg: pytest.fail("ran before the check"))
    (tmp_path / "afile").write_text("x")
    assert main(["sweep", "--grid", "r=4", "--out", str(tmp_path / "afile")]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "x"
