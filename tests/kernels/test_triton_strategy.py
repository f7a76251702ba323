"""The triton backend's strategy choice (kernels/triton/strategy.py, launch.py) and the report of what
ran (kernels.backend_report): the choice is the static model's fastest prediction, a pure function
of the shapes; LORAFUSE_STRATEGY forces one; every call runs what was chosen and says so; and the
kernels on both sides of each switch point of the benchmark shapes are right at those M.
"""
import logging

import pytest
import torch

import kernels
from builders import DEVICE, assert_close, make_lora, make_weight, rand, ref_backward, ref_forward
from kernels import backends, formats
from kernels.triton import strategy

LLAMA = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N), the benchmark shapes
NF4 = formats.FMT_4BIT


def _choose(pass_, M, K, N, r=16, fmt=NF4, dropout=False):
    return strategy.choose(pass_, M, N, K, r, fmt, 2, dropout)


def switch_points(pass_, K, N, r=16, fmt=NF4, m_max=16384):
    """[(M, strategy below, strategy from M on)] where the forward / backward choice changes."""
    out, prev = [], _choose(pass_, 1, K, N, r, fmt).strategy
    for M in range(2, m_max + 1):
        now = _choose(pass_, M, K, N, r, fmt).strategy
        if now != prev:
            out.append((M, prev, now))
            prev = now
    return out


@pytest.mark.parametrize("K,N", LLAMA)
def test_auto_takes_the_fastest_prediction(K, N):
    for pass_ in ("forward", "backward"):
        for M in (1, 16, 64, 512, 4096, 8192):
            choice = _choose(pass_, M, K, N)
            times = dict(choice.predicted_us)
            assert set(times) == set(strategy.STRATEGIES[pass_])  # "fused" predicted too, for the report
            assert times[choice.strategy] == min(times[s] for s in strategy.AUTO[pass_]), (pass_, M, choice)
            assert choice == _choose(pass_, M, K, N)  # deterministic


@pytest.mark.parametrize("K,N", LLAMA)
def test_decode_streams_training_shapes_dequantize_once(K, N):
    """What the model says for the benchmark shapes (NOTES.md has the numbers): the one-launch gemv
    at decode sizes, dequantize + cuBLAS at training sizes, in both passes."""
    for M in (1, 16):
        assert _choose("forward", M, K, N).strategy == "gemv"
    for M in (4096, 8192):
        assert _choose("forward", M, K, N).strategy == "dequant-mm"
        assert _choose("backward", M, K, N).strategy == "dequant-mm"
    points = switch_points("forward", K, N)
    # one switch, or a few where the gemv's cost steps by whole 64-row tiles and dequant-mm's grows with M
    assert points[0][1] == "gemv" and points[-1][2] == "dequant-mm", points
    assert points[-1][0] - points[0][0] <= 2 * 64, points


def test_forcing_a_strategy(monkeypatch):
    monkeypatch.setenv("LORAFUSE_STRATEGY", "fused")
    assert _choose("forward", 1, 4096, 4096).strategy == "fused"
    assert _choose("backward", 8192, 4096, 4096).why == "LORAFUSE_STRATEGY"
    monkeypatch.setenv("LORAFUSE_STRATEGY", "gemv")  # forward only: backward keeps the model's choice
    assert _choose("forward", 8192, 4096, 4096).strategy == "gemv"
    back = _choose("backward", 8192, 4096, 4096)
    assert back.strategy == "dequant-mm" and "names no backward strategy" in back.why


# The kernels at the M where the benchmark shapes' forward first switches, run at interpreter-sized
# N, K with the strategy on each side forced: the row tiling (16 / 32 / 64-row tiles, several row
# tiles, a partial last one) is what depends on M. Plus the 16 / 17 and 64 / 65 row-tile boundaries.
_POINTS = sorted({M for K, N in LLAMA for M in (switch_points("forward", K, N)[0][0] - 1,
                                               switch_points("forward", K, N)[0][0])} | {16, 17, 64, 65})


@pytest.mark.slow
@pytest.mark.parametrize("M", _POINTS)
def test_every_strategy_is_right_at_the_switch_points(M, monkeypatch):
    K, N, r = 192, 40, 16  # K a multiple of the blocksize: bnb's CPU dequantize (the truth) needs it
    weight, W64 = make_weight("nf4", N, K)
    A, B = make_lora(N, K, r)
    x0 = rand((M, K), torch.bfloat16)
    g = rand((M, N), torch.bfloat16, seed=4)
    y_r, u64, mag_y, _ = ref_forward(x0, W64, None, A, B, 2.0, 0.1, 9)
    (dx_r, dA_r, dB_r), (mdx, mdA, mdB) = ref_backward(g, x0, u64, W64, A, B, 2.0, 0.1, 9)
    for forced in ("gemv", "dequant-mm"):  # backward: gemv -> the model's choice, dequant-mm forced
        monkeypatch.setenv("LORAFUSE_STRATEGY", forced)
        backends.reset_report()
        x = x0.clone().requires_grad_()
        A_, B_ = A.clone().requires_grad_(), B.clone().requires_grad_()
        y = kernels.lora_linear(x, weight, None, A_, B_, 2.0, 0.1, training=True, backend="triton", seed=9)
        y.backward(g)
        ran = {e["pass"]: e["strategy"] for e in kernels.backend_report()}
        assert ran["forward"] == forced
        assert_close(f"y {forced}", y.detach(), y_r, mag_y, x.dtype, w_roundings=2 if forced == "gemv" else 0)
        assert_close(f"dx {ran['backward']}", x.grad, dx_r, mdx, x.dtype)
        assert_close("dA", A_.grad, dA_r, mdA, x.dtype)
        assert_close("dB", B_.grad, dB_r, mdB, x.dtype)


def test_report_says_what_ran_once_per_shape(caplog):
    """Each pass of each call shape is recorded with its backend, strategy, why, the predictions and
    a count; the "kernels" logger gets one line the first time only."""
    K, N = 130, 70
    weight, _ = make_weight("nf4", N, K)
    A, B = make_lora(N, K, 8)
    backends.reset_report()
    with caplog.at_level(logging.INFO, logger="kernels"):
        for _ in range(2):
            x = rand((5, K), torch.bfloat16).requires_grad_()
            kernels.lora_linear(x, weight, None, A, B, 2.0, backend="triton").sum().backward()
    report = {e["pass"]: e for e in kernels.backend_report()}
    fwd, bwd = report["forward"], report["backward"]
    assert (fwd["backend"], fwd["M"], fwd["N"], fwd["K"], fwd["r"], fwd["calls"]) == ("triton", 5, N, K, 8, 2)
    assert fwd["strategy"] == _choose("forward", 5, K, N, r=8).strategy and bwd["calls"] == 2
    assert set(fwd["predicted_us"]) == set(strategy.STRATEGIES["forward"])
    lines = [r.getMessage() for r in caplog.records if r.name == "kernels"]
    assert len(lines) == 2 and all("M=5 N=70 K=130 r=8" in line for line in lines), lines


def test_report_names_the_torch_fallback_and_why(capsys):
    """backend="auto" on CPU runs torch; the report says so with the reason."""
    K, N = 64, 32
    weight, _ = make_weight("nf4", N, K)
    backends.reset_report()
    backends.reset_warnings()
    kernels.lora_linear(rand((3, K), torch.bfloat16), weight, None, None, None, 1.0, backend="auto")
    (entry,) = kernels.backend_report()
    if DEVICE.type == "cpu":
        assert (entry["backend"], entry["strategy"]) == ("torch", "torch") and "CUDA" in entry["why"]
        assert f"uses torch ({entry['why']})" in capsys.readouterr().err
