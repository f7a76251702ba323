"""The LoRA flags of `python -m train` (issue 13): every LoraConfig field that makes sense on a
command line reaches lora_core as peft spells it, bad values fail before any work with the flag
named, and a run with DoRA + an OLoRA init + LoRA+ trains and saves peft's DoRA file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from train.config import lora_kwargs, parse_args


def test_every_lora_flag_reaches_the_lora_config():
    from lora_core import LoraConfig

    cfg = parse_args(["--r", "8", "--lora-alpha", "4", "--use-rslora", "--use-dora", "--init-lora-weights",
                      "pissa_niter_4", "--bias", "all", "--exclude-modules", "k_proj", "--modules-to-save",
                      "lm_head", "--layers-to-transform", "0,1", "--layers-pattern", "layers",
                      "--rank-pattern", '{"down_proj": 4}', "--alpha-pattern", '{"down_proj": 2}',
                      "--target-modules", "q_proj,down_proj"])
    lc = LoraConfig(**lora_kwargs(cfg))
    assert (lc.r, lc.lora_alpha, lc.use_rslora, lc.use_dora, lc.init_lora_weights, lc.bias) == (
        8, 4, True, True, "pissa_niter_4", "all")
    assert lc.exclude_modules == {"k_proj"} and lc.modules_to_save == ["lm_head"]
    assert lc.layers_to_transform == [0, 1] and lc.layers_pattern == ["layers"]
    assert lc.rank_pattern == {"down_proj": 4} and lc.alpha_pattern == {"down_proj": 2}
    assert lc.target_modules == {"q_proj", "down_proj"}
    lq = LoraConfig(**lora_kwargs(parse_args(["--init-lora-weights", "loftq", "--loftq-bits", "8",
                                              "--loftq-iter", "3", "--lora-bias", "--init-lora-weights", "false"])))
    assert (lq.init_lora_weights, lq.lora_bias, lq.loftq_config) == (False, True, {})
    lq = LoraConfig(**lora_kwargs(parse_args(["--init-lora-weights", "loftq", "--loftq-bits", "8",
                                              "--loftq-iter", "3"])))
    assert lq.loftq_config == {"loftq_bits": 8, "loftq_iter": 3}
    assert LoraConfig(**lora_kwargs(parse_args([]))).init_lora_weights is True  # the default: peft's


@pytest.mark.parametrize("kw, match", [
    (dict(init_lora_weights="corda"), r"--init-lora-weights is not valid: init_lora_weights='corda'"),
    (dict(init_lora_weights="pissa_niter_x"), r"--init-lora-weights is not valid"),
    (dict(rank_pattern="{x"), r"--rank-pattern is not valid: must be a JSON object"),
    (dict(rank_pattern='{"q": 0}'), r"--rank-pattern is not valid: rank_pattern\['q'\]=0"),
    (dict(alpha_pattern="[1]"), r"--alpha-pattern is not valid: must be a JSON object"),
    (dict(layers_to_transform="a,b"), r"--layers-to-transform is not valid: must be comma-separated"),
    (dict(loraplus_lr_ratio=-1.0), r"--loraplus-lr-ratio must be finite and >= 0"),
    (dict(use_dora=True, lora_bias=True), r"LoRA options: lora_bias=True is not supported with use_dora"),
    (dict(init_lora_weights="orthogonal", r=5), r"LoRA options: .*needs an even rank"),
    (dict(init_lora_weights="pissa", lora_bias=True), r"LoRA options: lora_bias=True works with"),
], ids=["init-unknown", "pissa-niter", "json", "rank-0", "alpha-list", "layers", "loraplus", "dora-bias",
        "orthogonal-odd", "pissa-bias"])
def test_bad_lora_options_fail_before_any_work(fast_cfg, no_model_load, kw, match):
    from train import TrainError, run

    cfg = fast_cfg(**kw)
    with pytest.raises(TrainError, match=match):
        run(cfg)
    assert not Path(cfg.output_dir).exists()


def test_triton_kernel_with_dora_is_refused_before_any_work(fast_cfg, no_model_load, monkeypatch):
    import train.loop as loop
    from train import TrainError, run

    monkeypatch.setattr(loop, "_triton_problem", lambda: None)  # as if triton could run here
    monkeypatch.setattr(loop, "_triton_precision_problem", lambda cfg: None)
    with pytest.raises(TrainError, match="--backend triton cannot run --use-dora"):
        run(fast_cfg(backend="triton", use_dora=True))


def test_dora_olora_loraplus_run_trains_and_saves_peft_s_dora_file(fast_cfg, monkeypatch):
    import lora_core
    from train import run

    groups = []
    real = lora_core.create_loraplus_optimizer

    def spy(*a, **k):
        opt = real(*a, **k)
        groups.extend((g["lr"], len(g["params"])) for g in opt.param_groups)
        return opt

    monkeypatch.setattr(lora_core, "create_loraplus_optimizer", spy)
    cfg = fast_cfg(use_dora=True, init_lora_weights="olora", loraplus_lr_ratio=8.0, r=4, lora_alpha=8)
    res = run(cfg)
    assert res.after["eval_loss"] < res.before["eval_loss"]
    lr = cfg.learning_rate
    assert [g[0] for g in groups] == [lr, 1e-6, 8 * lr, 8 * lr] and groups[0][1] > 0 and groups[2][1] > 0
    adapter = res.adapter_dir
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert (conf["use_dora"], conf["init_lora_weights"], conf["r"]) == (True, "olora", 4)
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
