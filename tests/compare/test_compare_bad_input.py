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
    assert main(["equivalence", "--kernel", "triton"]) == 2
    err = capsys.readouterr().err
    assert "kernel 'triton' needs a CUDA GPU" in err and "TRITON_INTERPRET=1" in err


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
