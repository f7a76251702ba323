"""`compare analyze`: spectra, effective rank, norms, amplification and subspace similarity of adapters.

Adapters are written here straight in PEFT's format (config + safetensors) from chosen tensors, or
saved by peft / lora_core from tiny models; no training.
"""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

import compare
from compare.__main__ import main
from compare.analyze import delta_svd, layer_stats, LoraPair, subspace_similarity
from tiny_models import load_tiny, save_tiny

PREFIX = "base_model.model."


def write_adapter(path, layers, r, lora_alpha=16, fmt="safetensors", **config):
    """A PEFT-format adapter folder: {module path: (A [r, in], B [out, r])} and adapter_config.json."""
    path.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "use_rslora": False,
           "rank_pattern": {}, "alpha_pattern": {}, **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = {}
    for p, (A, B) in layers.items():
        tensors[f"{PREFIX}{p}.lora_A.weight"] = A.float().contiguous()
        tensors[f"{PREFIX}{p}.lora_B.weight"] = B.float().contiguous()
    if fmt == "bin":
        torch.save(tensors, path / "adapter_model.bin")
    else:
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def random_layers(names, r, in_f, out_f, gen):
    return {n: (torch.randn(r, in_f, generator=gen, dtype=torch.float64),
                torch.randn(out_f, r, generator=gen, dtype=torch.float64)) for n in names}


def orthogonal(n, gen):
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]


# ---- spectra, effective rank, norms --------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_spectra_equal_a_direct_svd(tmp_path, fmt):
    """Singular values, ||delta W||_F and effective rank equal a dense SVD of s*B@A, with the
    per-layer scaling of rank_pattern / alpha_pattern (fp64 both ways: agreement to 1e-10)."""
    gen = torch.Generator().manual_seed(1)
    layers = {"m.wide": (torch.randn(4, 48, generator=gen), torch.randn(96, 4, generator=gen)),
              "m.tall": (torch.randn(6, 96, generator=gen), torch.randn(40, 6, generator=gen))}
    folder = write_adapter(tmp_path / "a", layers, r=4, lora_alpha=8, fmt=fmt,
                           rank_pattern={"tall": 6}, alpha_pattern={"tall": 3})
    result = compare.analyze(folder)
    for name, (A, B), s in (("m.wide", layers["m.wide"], 8 / 4), ("m.tall", layers["m.tall"], 3 / 6)):
        dense = s * B.double() @ A.double()                                   # [out, in]
        sv = torch.linalg.svdvals(dense)[: A.shape[0]]
        got = result["layers"][name]
        assert got["scaling"] == s and got["r"] == A.shape[0] and got["shape"] == list(dense.shape)
        torch.testing.assert_close(torch.tensor(got["singular_values"], dtype=torch.float64), sv,
                                   rtol=1e-10, atol=0)
        assert math.isclose(got["delta_fro"], torch.linalg.matrix_norm(dense).item(), rel_tol=1e-10)
        p = sv / sv.sum()
        assert math.isclose(got["effective_rank"], math.exp(-(p * p.log()).sum().item()), rel_tol=1e-10)
        assert 1.0 <= got["effective_rank"] <= A.shape[0]


def test_delta_svd_factors_delta_w():
    gen = torch.Generator().manual_seed(2)
    pair = LoraPair(torch.randn(5, 70, generator=gen, dtype=torch.float64),
                    torch.randn(30, 5, generator=gen, dtype=torch.float64), scaling=-1.5)
    U, S, V = delta_svd(pair)
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, -1.5 * pair.B @ pair.A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(U.T @ U, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(V.T @ V, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (S[:-1] >= S[1:]).all()


def test_effective_rank_extremes():
    """One direction -> 1; a flat spectrum -> r; an untrained adapter (B = 0) -> 0 and no amplification."""
    e = torch.eye(8, dtype=torch.float64)
    one = layer_stats(LoraPair(e[:3], torch.outer(e[0], torch.tensor([1.0, 0, 0], dtype=torch.float64)), 1.0))
    flat = layer_stats(LoraPair(e[:3], e[:, :3], 2.0))
    zero = layer_stats(LoraPair(e[:3], torch.zeros(8, 3, dtype=torch.float64), 2.0), W=e)
    assert one["effective_rank"] == pytest.approx(1.0) and flat["effective_rank"] == pytest.approx(3.0)
    assert zero["effective_rank"] == 0.0 and zero["delta_fro"] == 0.0 and zero["amplification"] is None


@pytest.mark.parametrize("case", ["patterns", "rslora", "gpt2_conv1d"])
def test_reads_peft_adapters_with_peft_scaling(tmp_path, case):
    """An adapter saved by peft: our spectrum of every layer equals the SVD of peft's own
    get_delta_weight (rank_pattern / alpha_pattern, use_rslora, GPT-2's fan_in_fan_out Conv1D)."""
    import peft

    arch = "gpt2" if case == "gpt2_conv1d" else "llama"
    model = load_tiny(save_tiny(arch, tmp_path / "base"), arch)
    kw = {"patterns": dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
                           rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 32}),
          "rslora": dict(target_modules=["q_proj", "up_proj"], r=8, lora_alpha=4, use_rslora=True),
          "gpt2_conv1d": dict(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=12, fan_in_fan_out=True)}[case]
    pm = peft.get_peft_model(model, peft.LoraConfig(**kw))
    torch.manual_seed(3)
    for n, m in pm.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            torch.nn.init.normal_(m.lora_B["default"].weight)
    pm.save_pretrained(tmp_path / "adapter")
    result = compare.analyze(tmp_path / "adapter", base=str(tmp_path / "base"))
    expected = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
                if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(result["layers"]) == set(expected)
    for path, m in expected.items():
        sv = torch.linalg.svdvals(m.get_delta_weight("default").double())[: m.r["default"]]
        got = torch.tensor(result["layers"][path]["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(got, sv, rtol=1e-5, atol=0)  # peft's delta is fp32: 1e-5 relative
        # W as [out, in] (Conv1D stores [in, out], and so does peft's delta with fan_in_fan_out)
        ratio = (m.get_delta_weight("default").norm() / m.get_base_layer().weight.norm()).item()
        assert result["layers"][path]["delta_to_base"] == pytest.approx(ratio, rel=1e-5)


# ---- amplification ---------------------------------------------------------------------------------
def test_amplification_on_a_constructed_case():
    """delta W = s (3 u1 v1^T + 4 u2 v2^T), W = 5 u1 v1^T + 7 u3 v3^T + 6 u1 v3^T + 2 u4 v1^T (unit
    vectors of random orthonormal bases). U = [u1 u2], V = [v1 v2] up to sign: U^T W V keeps only
    the 5 (the 6 is outside V's span, the 2 outside U's), so amplification = 5s / 5 = s and
    ||delta W|| / ||W|| = 5 s / sqrt(25 + 49 + 36 + 4)."""
    gen = torch.Generator().manual_seed(4)
    Qo, Qi = orthogonal(24, gen), orthogonal(40, gen)                   # columns: u_k [24], v_k [40]
    u, v = Qo.T, Qi.T
    A = torch.stack([v[0], v[1]])                                     # [2, 40]
    B = torch.stack([3 * u[0], 4 * u[1]], dim=1)                      # [24, 2]
    W = (5 * torch.outer(u[0], v[0]) + 7 * torch.outer(u[2], v[2])    # [24, 40]
         + 6 * torch.outer(u[0], v[2]) + 2 * torch.outer(u[3], v[0]))
    s = 1.75
    got = layer_stats(LoraPair(A, B, s), W=W)
    assert got["delta_fro"] == pytest.approx(5 * s, rel=1e-12)
    assert got["projected_base_fro"] == pytest.approx(5.0, rel=1e-12)
    assert got["amplification"] == pytest.approx(s, rel=1e-12)
    assert got["delta_to_base"] == pytest.approx(5 * s / math.sqrt(114), rel=1e-12)


def test_base_from_a_model_folder_and_builtin(tmp_path):
    """--base reads W of each adapted layer: a saved tiny Llama with one weight set by hand, and
    train's bundled model rebuilt from the run's seed."""
    base_dir = save_tiny("llama", tmp_path / "base")
    model = load_tiny(base_dir, "llama")
    e = torch.eye(64, dtype=torch.float64)
    W = 5 * torch.outer(e[3], e[1]) + 7 * torch.outer(e[10], e[20])
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.copy_(W)
    model.save_pretrained(base_dir)
    A, B = torch.stack([e[1], e[2]]), torch.stack([3 * e[3], 4 * e[4]], dim=1)
    folder = write_adapter(tmp_path / "a", {"model.layers.0.self_attn.q_proj": (A, B)}, r=2, lora_alpha=2)
    got = compare.analyze(folder, base=str(base_dir))["layers"]["model.layers.0.self_attn.q_proj"]
    assert got["amplification"] == pytest.approx(1.0) and got["delta_to_base"] == pytest.approx(5 / math.sqrt(74))

    from train.models import load_base_model

    gen = torch.Generator().manual_seed(5)
    layer = "model.layers.1.mlp.down_proj"                              # builtin: [128, 256]
    A, B = torch.randn(3, 256, generator=gen), torch.randn(128, 3, generator=gen)
    folder = write_adapter(tmp_path / "b", {layer: (A, B)}, r=3, lora_alpha=6)
    got = compare.analyze(folder, base="builtin:tiny-llama", base_seed=7)["layers"][layer]
    W = load_base_model("builtin:tiny-llama", "none", 7).get_submodule(layer).weight.double()
    dense = 2.0 * B.double() @ A.double()
    assert got["delta_to_base"] == pytest.approx((dense.norm() / W.norm()).item(), rel=1e-9)


# ---- subspace similarity -----------------------------------------------------------------------------
@pytest.mark.parametrize("subspace", ["A", "delta_right", "delta_left"])
def test_phi_of_an_adapter_against_itself_is_one(tmp_path, subspace):
    """phi(i, j) = ||U[:, :i]^T U[:, :j]||^2 / min(i, j) = min(i, j) / min(i, j): 1 on the diagonal
    and everywhere else."""
    gen = torch.Generator().manual_seed(6)
    folder = write_adapter(tmp_path / "a", random_layers(["x.q", "x.v"], 6, 32, 48, gen), r=6)
    result = compare.analyze(folder, against=folder, subspace=subspace)
    assert result["subspace"] == subspace
    for s in result["layers"].values():
        phi = torch.tensor(s["subspace_similarity"])
        assert phi.shape == (6, 6)
        torch.testing.assert_close(torch.diagonal(phi), torch.ones(6), rtol=0, atol=1e-6)
        torch.testing.assert_close(phi, torch.ones(6, 6), rtol=0, atol=1e-6)


def random_phi_variance(i, j, K):
    """Var of ||U1_i^T U2_j||_F^2 for a fixed i-dim and a uniformly random j-dim subspace of R^K:
    2 i j (K - i)(K - j) / (K^2 (K - 1)(K + 2)). For i = 1 it is the Beta(j/2, (K-j)/2) variance;
    checked against 2e5 random draws (K=16, i=4, j=8: 0.0895 measured vs 0.0889)."""
    return 2 * i * j * (K - i) * (K - j) / (K ** 2 * (K - 1) * (K + 2))


@pytest.mark.parametrize("subspace", ["A", "delta_right", "delta_left"])
def test_phi_against_an_unrelated_random_adapter(tmp_path, subspace):
    """Expectation for unrelated random subspaces: each of the j columns u of U2 is uniform on the
    sphere of R^K, and the projection onto U1's i columns keeps on average i/K of |u|^2, so
    E ||U1_i^T U2_j||_F^2 = i j / K and E phi(i, j) = max(i, j) / K.

    Gaussian A and B make every subspace here uniformly random (rotation invariance), with
    K = in (96) for A and delta W's right vectors and K = out (160) for its left ones. The mean of
    phi over L = 24 independent layers must lie within 5 standard deviations of the mean
    (sqrt(random_phi_variance) / min(i, j) / sqrt(L)) of max(i, j)/K, per (i, j): a correct
    implementation fails with probability < 1e-5 per entry, while a wrong normalisation
    (i j / K) or the wrong side (K = 160 instead of 96, or back) is off by more than that.
    """
    gen = torch.Generator().manual_seed(7)
    names = [f"layers.{k}.proj" for k in range(24)]
    a = write_adapter(tmp_path / "a", random_layers(names, 4, 96, 160, gen), r=4)
    b = write_adapter(tmp_path / "b", random_layers(names, 8, 96, 160, gen), r=8)
    result = compare.analyze(a, against=b, subspace=subspace)
    K = 160 if subspace == "delta_left" else 96
    mean = torch.tensor(result["summary"]["mean_subspace_similarity"], dtype=torch.float64)
    assert mean.shape == (4, 8) and result["summary"]["mean_subspace_similarity_layers"] == 24
    assert all(s["ambient_dim"] == K for s in result["layers"].values())
    i = torch.arange(1, 5, dtype=torch.float64)[:, None]
    j = torch.arange(1, 9, dtype=torch.float64)[None, :]
    expected = torch.maximum(i, j) / K
    std_of_mean = random_phi_variance(i, j, K).sqrt() / torch.minimum(i, j) / math.sqrt(len(names))
    assert ((mean - expected).abs() <= 5 * std_of_mean).all(), (mean - expected) / std_of_mean
    wrong_side = torch.maximum(i, j) / (96 + 160 - K)
    assert ((wrong_side - expected).abs() > 5 * std_of_mean).any()  # the test can tell K apart


def test_subspace_similarity_by_hand():
    """phi on explicit bases: U2's first direction is U1's second, its second is new."""
    e = torch.eye(5, dtype=torch.float64)
    U1, U2 = e[:, [0, 1]], e[:, [1, 2]]
    phi = subspace_similarity(U1, U2)
    torch.testing.assert_close(phi, torch.tensor([[0.0, 0.0], [1.0, 0.5]], dtype=torch.float64))


def test_partly_common_layers_are_listed(tmp_path):
    gen = torch.Generator().manual_seed(8)
    a = write_adapter(tmp_path / "a", random_layers(["m.q", "m.k"], 2, 16, 16, gen), r=2)
    b = write_adapter(tmp_path / "b", random_layers(["m.k", "m.v"], 3, 16, 16, gen), r=3)
    result = compare.analyze(a, against=b)
    assert result["only_in_adapter"] == ["m.q"] and result["only_in_against"] == ["m.v"]
    assert "subspace_similarity" not in result["layers"]["m.q"]
    assert len(result["layers"]["m.k"]["subspace_similarity"]) == 2
    assert len(result["layers"]["m.k"]["subspace_similarity"][0]) == 3


# ---- the CLI and the output folder ---------------------------------------------------------------
def test_cli_writes_analysis_json_and_pngs(tmp_path, capsys):
    """From a lora_core-saved adapter in a `python -m train`-style run folder (RUN/adapter)."""
    from lora_core import LoraConfig, get_lora_model

    base_dir = save_tiny("llama", tmp_path / "base")
    ours = []
    for r in (2, 4):
        model = get_lora_model(load_tiny(base_dir, "llama"),
                               LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
        for layer in model.lora_layers().values():
            torch.nn.init.normal_(layer.lora_B["default"].weight)
        model.save_pretrained(tmp_path / f"run{r}" / "adapter")
        ours.append(model)
    out = tmp_path / "analysis"
    rc = main(["analyze", str(tmp_path / "run2"), "--against", str(tmp_path / "run4" / "adapter"),
               "--base", str(base_dir), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "amplif." in printed and "phi(1,1)" in printed and "0.self_attn.q_proj" in printed
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "norms.png", "spectra.png",
                                                     "subspace_similarity.png"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "analysis.json").read_text())
    assert data["subspace"] == "A" and "lora_A" in data["subspace_meaning"]
    assert len(data["layers"]) == 4
    for path, layer in ours[0].lora_layers().items():
        s = data["layers"][path]
        assert {"singular_values", "effective_rank", "delta_fro", "delta_to_base", "amplification",
                "subspace_similarity"} <= set(s)
        phi = s["subspace_similarity"]
        assert len(s["singular_values"]) == 2 and (len(phi), len(phi[0])) == (2, 4)
        dense = layer.delta_weight().double()
        assert s["delta_fro"] == pytest.approx(dense.norm().item(), rel=1e-5)
    assert not list(tmp_path.glob(".analysis.tmp-*"))  # no temp folder left


def test_an_earlier_analysis_is_not_destroyed(tmp_path, capsys):
    gen = torch.Generator().manual_seed(9)
    a = write_adapter(tmp_path / "a", random_layers(["m.q"], 2, 16, 16, gen), r=2)
    b = write_adapter(tmp_path / "b", random_layers(["m.q"], 2, 16, 16, gen), r=2)
    out = tmp_path / "out"
    assert main(["analyze", str(a), "--against", str(b), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["analyze", str(b), "--out", str(out)]) == 2  # would replace it: refused
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Asked to: the analysis is replaced, the plot it no longer makes is gone, other files stay.
    assert main(["analyze", str(b), "--out", str(out), "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"analysis.json", "spectra.png", "norms.png", "notes.txt"}
    assert json.loads((out / "analysis.json").read_text())["adapter"] == str(b)
    assert (out / "notes.txt").read_text() == "mine"


def _bad_inputs(tmp_path):
    gen = torch.Generator().manual_seed(10)
    good = write_adapter(tmp_path / "good", random_layers(["model.layers.0.self_attn.q_proj"], 2, 96, 96, gen), r=2)
    other = write_adapter(tmp_path / "other", random_layers(["m.elsewhere"], 2, 96, 96, gen), r=2)
    ia3 = write_adapter(tmp_path / "ia3", {}, r=2, peft_type="IA3")
    wrong_r = write_adapter(tmp_path / "wrong_r", random_layers(["m.q"], 2, 8, 8, gen), r=4)
    not_lora = tmp_path / "model"
    not_lora.mkdir()
    (not_lora / "config.json").write_text("{}")
    (tmp_path / "a_file").write_text("x")
    base = save_tiny("llama", tmp_path / "base64")  # hidden 64: the adapter's 96 does not fit
    g = str(good)
    return {
        "missing folder": ([str(tmp_path / "nope")], "does not exist"),
        "not an adapter": ([str(not_lora)], "adapter_config.json"),
        "not LoRA": ([str(ia3)], "peft_type is 'IA3'"),
        "rank differs from config": ([str(wrong_r)], "rank 2 in its weights but 4"),
        "no common layers": ([g, "--against", str(other)], "no adapted layer in common"),
        "base does not fit": ([g, "--base", str(base)], "base W [64, 64] vs the adapter's [out, in] [96, 96]"),
        "base missing": ([g, "--base", str(tmp_path / "no_model")], "cannot load it"),
        "out is a file": ([g, "--out", str(tmp_path / "a_file")], "is a file"),
    }


def test_bad_input_one_error_line_exit_2(tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    for label, (args, expect) in cases.items():
        out = tmp_path / f"out-{label.replace(' ', '_')}"
        if "--out" not in args:
            args = [*args, "--out", str(out)]
        rc = main(["analyze", *args])
        err = capsys.readouterr().err.splitlines()
        errors = [line for line in err if line.startswith("error:")]
        assert rc == 2, label
        assert len(errors) == 1 and expect in errors[0], (label, err)
        assert not out.exists(), label  # nothing written
    assert main(["analyze", str(tmp_path / "good"), "--out", str(tmp_path / "ok")]) == 0  # the good one works


def test_compare_analyze_stays_the_function_after_importing_its_module():
    import importlib

    importlib.import_module("compare.analyze")
    assert callable(compare.analyze) and compare.analyze.__name__ == "analyze"
