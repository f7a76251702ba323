"""What a LoRA adapter learned, layer by layer: the analyses of Hu et al. 2021 (LoRA), section 7.

    python -m compare analyze runs/a/adapter --against runs/b/adapter --base builtin:tiny-llama --out an
    compare.analyze("runs/a/adapter", against="runs/b/adapter", out_dir="an")

For every adapted layer, with A: [r, in], B: [out, r] and delta W = s * B @ A  [out, in]
(s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; rank_pattern / alpha_pattern per layer,
matched as peft does; fan_in_fan_out changes how a base stores W, never B @ A's [out, in] layout):

  delta_fro            ||delta W||_F
  singular_values      the singular values of delta W (all r of them, largest first)
  effective_rank       exp(H(p)), p = sigma / sum(sigma), H(p) = -sum p log p: the entropy effective
                       rank of Roy & Vetterli (2007). 1 when one direction carries everything, r for a
                       flat spectrum; 0 for an all-zero delta (an untrained adapter: B starts at zero).
  with a base model (its weight W, [out, in]):
  delta_to_base        ||delta W||_F / ||W||_F
  amplification        ||delta W||_F / ||U^T W V||_F, U [out, r] and V [in, r] the left and right
                       singular vectors of delta W (section 7.3 writes U^T W V^T with V^T as an SVD
                       returns it): how much delta W amplifies the directions it shares with W.
                       The paper measured ~21.5 for r=4 on GPT-3's W_q: directions W barely uses.
  with a second adapter:
  subspace_similarity  phi(i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), i = 1..r1, j = 1..r2,
                       stored as [i-1][j-1] (section 7.2). U1, U2: by default the right singular
                       vectors of the two A matrices, as in the paper; `subspace` picks delta W's
                       right or left singular vectors instead. 1: the top-min(i, j) directions of one
                       lie in the span of the other's; two unrelated random subspaces of R^K give
                       max(i, j) / K on average.

Adapters are read straight from PEFT-format folders (adapter_config.json + adapter_model.safetensors
or .bin; ours and peft's alike, or a hub id), so nothing here needs the model they were trained on
unless `base` is given. Every input is checked (folders, configs, weights, common layers, base
shapes, the output folder) before anything is computed or written.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .models import CompareError
from .report import write_json

PathLike = Union[str, os.PathLike]

# subspace -> what U1 / U2 are in phi; the names are also what analysis.json reports.
SUBSPACES = {
    "A": "right singular vectors of lora_A (the input-space directions A reads; Hu et al. 2021, 7.2)",
    "delta_right": "right singular vectors of delta W = s*B@A (input space, weighted by B)",
    "delta_left": "left singular vectors of delta W = s*B@A (output space)",
}
ANALYSIS = "analysis.json"
PLOTS = ("spectra.png", "norms.png", "subspace_similarity.png")
DEFAULT_BASE_SEED = 42  # train's default --seed: the bundled tiny Llama is built from the run's seed
_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])\.weight")


@dataclass
class LoraPair:
    """One adapted layer as stored: A [r, in], B [out, r] (float64 copies) and its scaling s."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> list[int]:  # delta W's [out, in]
        return [self.B.shape[0], self.A.shape[1]]


@dataclass
class Adapter:
    """An adapter folder's LoRA layers by module path, and what could not be analysed."""

    source: str
    directory: Path
    config: dict
    layers: dict[str, LoraPair]
    skipped: list[str] = field(default_factory=list)  # embedding / conv LoRA, unpaired A or B


# ---- reading adapters ------------------------------------------------------------------------------
def read_adapter(source: PathLike) -> Adapter:
    """The LoRA layers of the PEFT-format adapter at `source` (a folder, a run folder holding
    `adapter/`, or a hub id). Raises CompareError, one line, on anything that is not a LoRA adapter."""
    from lora_core import io as lora_io  # CONFIG_NAME etc. and the folder / hub-id resolver

    path = Path(source).expanduser()
    if (path.is_dir() and not (path / lora_io.CONFIG_NAME).exists()
            and (path / "adapter" / lora_io.CONFIG_NAME).is_file()):
        path = path / "adapter"  # a `python -m train` run folder
    try:
        local = lora_io._local_dir(path if path.exists() else str(source), need_weights=True)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise CompareError(f"adapter {source}: {_one_line(e)}") from None
    cfg_path = local / lora_io.CONFIG_NAME
    if not cfg_path.is_file():
        raise CompareError(f"adapter {source}: no {lora_io.CONFIG_NAME} in {local}, so it is not a "
                           f"PEFT-format adapter folder")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompareError(f"adapter {source}: {cfg_path} is not valid JSON ({_one_line(e)})") from None
    if not isinstance(config, dict):
        raise CompareError(f"adapter {source}: {cfg_path} does not hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise CompareError(f"adapter {source}: peft_type is {config['peft_type']!r}, not 'LORA'")
    if config.get("use_dora"):
        raise CompareError(f"adapter {source}: a DoRA adapter (use_dora); its weight change also "
                           f"depends on the magnitude vector and the base, not only s*B@A")
    tensors = _read_tensors(local, source, lora_io)

    found: dict[str, dict[str, torch.Tensor]] = {}
    skipped = set()
    for key, t in tensors.items():
        m = _LORA_KEY.fullmatch(key)
        if m and t.dim() == 2:
            found.setdefault(m["path"], {})[m["ab"]] = t
        elif m or ".lora_embedding_" in key:
            skipped.add(key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0])
    layers = {}
    for path, ab in sorted(found.items()):
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
            skipped.add(path)
            continue
        layers[path] = _pair(path, ab["A"], ab["B"], config, source)
    if not layers:
        raise CompareError(f"adapter {source}: no LoRA layers (2-D lora_A / lora_B weight pairs) among "
                           f"its {len(tensors)} tensors")
    return Adapter(str(source), local, config, layers, sorted(skipped - set(layers)))


def _read_tensors(local: Path, source, lora_io) -> dict[str, torch.Tensor]:
    st, bn = local / lora_io.WEIGHTS_NAME, local / lora_io.WEIGHTS_NAME_BIN
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st), device="cpu")
        if bn.is_file():
            return torch.load(str(bn), map_location="cpu", weights_only=True)  # a pickle: no code runs
    except Exception as e:  # a truncated or foreign file: say which
        raise CompareError(f"adapter {source}: cannot read its weights ({type(e).__name__}: "
                           f"{_one_line(e)})") from None
    raise CompareError(f"adapter {source}: no {lora_io.WEIGHTS_NAME} or {lora_io.WEIGHTS_NAME_BIN} in {local}")


def _pair(path: str, A: torch.Tensor, B: torch.Tensor, config: dict, source) -> LoraPair:
    from lora_core.inject import pattern_value  # peft's rank_pattern / alpha_pattern lookup

    r = A.shape[0]
    r_cfg = pattern_value(config.get("rank_pattern") or {}, path, config.get("r", r))
    if r_cfg != r:
        raise CompareError(f"adapter {source}: {path} has rank {r} in its weights but {r_cfg} in "
                           f"adapter_config.json (r / rank_pattern), so its scaling is unknown")
    alpha = pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    A, B = A.detach().double(), B.detach().double()
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise CompareError(f"adapter {source}: {path} has non-finite values in lora_A or lora_B")
    return LoraPair(A, B, float(scaling))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---- the math ----------------------------------------------------------------------------------------
def delta_svd(pair: LoraPair) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [out, k], S [k], V [in, k]) with s * B @ A = U diag(S) V^T, k = min(r, out, in), largest first.

    Never forms the [out, in] matrix: with reduced QRs B = Qb Rb and A^T = Qa Ra,
    s*B@A = Qb (s Rb Ra^T) Qa^T, and the SVD of the small core, Uc S Vc^T, gives U = Qb Uc, V = Qa Vc.
    O((out + in) r^2) instead of a dense SVD's O(out * in * min(out, in)).
    """
    Qb, Rb = torch.linalg.qr(pair.B)                                  # [out, r], [r, r]
    Qa, Ra = torch.linalg.qr(pair.A.T)                                # [in, r], [r, r]
    Uc, S, Vch = torch.linalg.svd(pair.scaling * Rb @ Ra.T)           # core [r, r]
    return Qb @ Uc, S, Qa @ Vch.T


def effective_rank(S: torch.Tensor) -> float:
    """exp(entropy of p = S / sum(S)) (Roy & Vetterli 2007), in [1, len(S)]; 0.0 when S is all zero."""
    total = S.sum()
    if total <= 0:
        return 0.0
    p = S[S > 0] / total
    return math.exp(-(p * p.log()).sum().item())


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """phi [r1, r2]: phi[i-1, j-1] = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), for orthonormal
    columns U1 [K, r1] and U2 [K, r2] ordered by importance (Hu et al. 2021, eq. 4)."""
    cos2 = (U1.T @ U2) ** 2                                           # [r1, r2] squared cosines
    overlap = cos2.cumsum(0).cumsum(1)                                # [i-1, j-1]: ||U1_i^T U2_j||_F^2
    i = torch.arange(1, U1.shape[1] + 1, dtype=overlap.dtype)[:, None]
    j = torch.arange(1, U2.shape[1] + 1, dtype=overlap.dtype)[None, :]
    return overlap / torch.minimum(i, j)


def _basis(pair: LoraPair, svd, subspace: str) -> Optional[torch.Tensor]:
    """The ordered orthonormal directions phi compares ([K, r]); None for a zero delta W's, which
    has no directions."""
    if subspace == "A":
        return torch.linalg.svd(pair.A, full_matrices=False).Vh.T     # [in, r]
    U, S, V = svd
    if not (S > 0).any():
        return None
    return V if subspace == "delta_right" else U


def layer_stats(pair: LoraPair, W: Optional[torch.Tensor] = None, other: Optional[LoraPair] = None,
                subspace: str = "A") -> dict:
    """The numbers analysis.json keeps for one layer (see the module docstring); W [out, in] float64."""
    svd = delta_svd(pair)
    U, S, V = svd
    fro = S.norm().item()  # = ||s*B@A||_F
    out = {"r": pair.r, "scaling": pair.scaling, "shape": pair.shape, "delta_fro": fro,
           "singular_values": S.tolist(), "effective_rank": effective_rank(S)}
    if W is not None:
        w_fro = W.norm().item()
        projected = (U.T @ W @ V).norm().item()                       # ||U^T W V||_F, [k, k] core
        out["base_fro"] = w_fro
        out["delta_to_base"] = fro / w_fro if w_fro > 0 else math.inf
        out["projected_base_fro"] = projected
        out["amplification"] = None if fro == 0 else (fro / projected if projected > 0 else math.inf)
    if other is not None:
        b1, b2 = _basis(pair, svd, subspace), _basis(other, delta_svd(other), subspace)
        phi = None if b1 is None or b2 is None else subspace_similarity(b1, b2)
        out["subspace_similarity"] = None if phi is None else phi.tolist()
        out["ambient_dim"] = pair.shape[0] if subspace == "delta_left" else pair.shape[1]  # K of R^K
    return out


# ---- the base model ----------------------------------------------------------------------------------
def base_weights(base: str, adapter: Adapter, seed: int = DEFAULT_BASE_SEED) -> dict[str, torch.Tensor]:
    """{layer path: W [out, in] float64} from `base` (a model folder, a hub id, or 'builtin:tiny-llama',
    built at `seed` as `python -m train --seed` builds it), loaded unquantized. CompareError if
    the base cannot be loaded or a layer is missing or has another shape."""
    from transformers.pytorch_utils import Conv1D

    from train.models import load_base_model

    try:
        model = load_base_model(base, "none", seed)
    except Exception as e:  # missing folder, offline hub, not a model: one line
        raise CompareError(f"--base {base}: cannot load it ({type(e).__name__}: {_one_line(e)[:300]})") from None
    weights, problems = {}, []
    for path, pair in adapter.layers.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            problems.append(f"{path} is not in the base")
            continue
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            problems.append(f"{path} has no 2-D weight in the base")
            continue
        w = w.detach().T if isinstance(module, Conv1D) else w.detach()  # Conv1D stores W as [in, out]
        if list(w.shape) != pair.shape:
            problems.append(f"{path}: base W {list(w.shape)} vs the adapter's [out, in] {pair.shape}")
            continue
        if not torch.isfinite(w).all():
            problems.append(f"{path}: the base W has non-finite values")
            continue
        weights[path] = w.double()
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CompareError(f"--base {base} does not fit adapter {adapter.source}: "
                           f"{'; '.join(problems[:3])}{more}")
    return weights


# ---- the entry point ---------------------------------------------------------------------------------
def analyze(adapter: PathLike, against: Optional[PathLike] = None, base: Optional[str] = None,
            out_dir: Optional[PathLike] = None, *, subspace: str = "A", base_seed: int = DEFAULT_BASE_SEED,
            overwrite: bool = False, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Analyse `adapter` (optionally against a second adapter and a base model); return the analysis.

    adapter, against: PEFT-format adapter folders (or run folders holding `adapter/`, or hub ids).
    base: the base model's folder, hub id or 'builtin:tiny-llama' (built at `base_seed`, the run's
    --seed). subspace: what phi compares, a key of SUBSPACES. out_dir: when given, writes
    analysis.json, spectra.png, norms.png and (with `against`) subspace_similarity.png there; an
    earlier analysis in it is refused unless `overwrite`. Layers only one adapter has are listed
    under `only_in_adapter` / `only_in_against`. Raises CompareError before any work on bad input.
    """
    say = progress or (lambda msg: None)
    if subspace not in SUBSPACES:
        raise CompareError(f"unknown subspace {subspace!r}; valid: {', '.join(SUBSPACES)}")
    out = None if out_dir is None else _check_out_dir(Path(out_dir), overwrite)
    first = read_adapter(adapter)
    second = read_adapter(against) if against is not None else None
    common = [p for p in first.layers if second is not None and p in second.layers]
    if second is not None:
        if not common:
            raise CompareError(f"adapters {adapter} and {against} have no adapted layer in common "
                               f"(e.g. {next(iter(first.layers))} vs {next(iter(second.layers))})")
        bad = [p for p in common if first.layers[p].shape != second.layers[p].shape]
        if bad:
            raise CompareError(f"adapters {adapter} and {against} adapt {bad[0]} with other shapes "
                               f"({first.layers[bad[0]].shape} vs {second.layers[bad[0]].shape}): "
                               f"trained on different base models")
    weights = None
    if base is not None:
        say(f"loading base {base}")
        weights = base_weights(base, first, base_seed)

    say(f"analysing {len(first.layers)} layers of {adapter}")
    layers = {p: layer_stats(pair, None if weights is None else weights[p],
                             second.layers.get(p) if second is not None else None, subspace)
              for p, pair in first.layers.items()}
    result = {
        "adapter": str(adapter), "against": None if against is None else str(against), "base": base,
        "base_seed": base_seed if base is not None and str(base).startswith("builtin:") else None,
        "subspace": subspace if second is not None else None,
        "subspace_meaning": SUBSPACES[subspace] if second is not None else None,
        "effective_rank_definition": "exp(H(p)), p = sigma / sum(sigma) (Roy & Vetterli 2007)",
        "layers": layers,
        "only_in_adapter": [p for p in first.layers if second is not None and p not in second.layers],
        "only_in_against": [] if second is None else [p for p in second.layers if p not in first.layers],
        "skipped": first.skipped,
        "summary": _summary(layers),
    }
    if out is not None:
        _write(out, result)
        say(f"wrote {out}")
    return result


def _summary(layers: dict) -> dict:
    """Means over layers; the mean phi only over layers whose phi has the most common shape."""
    def mean(key):
        vals = [s[key] for s in layers.values() if isinstance(s.get(key), (int, float)) and math.isfinite(s[key])]
        return sum(vals) / len(vals) if vals else None

    out = {"layers": len(layers), **{f"mean_{k}": mean(k) for k in
                                      ("delta_fro", "effective_rank", "delta_to_base", "amplification")}}
    phis = [torch.tensor(s["subspace_similarity"]) for s in layers.values() if s.get("subspace_similarity")]
    if phis:
        shapes = [tuple(p.shape) for p in phis]
        shape = max(set(shapes), key=shapes.count)
        same = [p for p in phis if tuple(p.shape) == shape]
        out["mean_subspace_similarity"] = torch.stack(same).mean(0).tolist()
        out["mean_subspace_similarity_layers"] = len(same)
    return out


# ---- writing -----------------------------------------------------------------------------------------
def _check_out_dir(out: Path, overwrite: bool) -> Path:
    """Refuse, before any work, an output path that is a file, holds an earlier analysis (unless
    `overwrite`), or cannot be created."""
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out} is a file; give a folder")
    earlier = [n for n in (ANALYSIS, *PLOTS) if (out / n).exists()]
    if earlier and not overwrite:
        raise CompareError(f"--out {out} already holds an analysis ({', '.join(earlier)}); pass "
                           f"--overwrite to replace it, or choose another folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CompareError(f"--out {out}: {parent} is not writable")
    return out


def _write(out: Path, result: dict) -> None:
    """Everything goes into a temporary folder beside `out` first. A new `out` appears whole, by one
    rename; an existing one gets each file replaced atomically, and plots the new analysis does not
    make are removed (they would describe the old one). Other files in `out` are kept."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        write_json(tmp / ANALYSIS, result)
        from .analyze_plots import write_plots

        made = {ANALYSIS, *write_plots(result, tmp)}
        if not out.exists():
            os.rename(tmp, out)
            return
        for name in sorted(made - {ANALYSIS}) + [ANALYSIS]:  # the json last: it names what is there
            os.replace(tmp / name, out / name)
        for name in PLOTS:
            if name not in made:
                (out / name).unlink(missing_ok=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def format_analysis(result: dict) -> str:
    """One row per layer: r, ||delta W||_F, effective rank, sigma_1, and the optional columns."""
    from .report import table

    layers = result["layers"]
    names = short_names(list(layers))
    has_base = result["base"] is not None
    has_phi = result["against"] is not None
    headers = ["layer", "r", "|dW|_F", "eff. rank", "sigma_1"]
    headers += ["|dW|/|W|", "amplif."] if has_base else []
    headers += ["phi(1,1)", "phi(k,k)"] if has_phi else []
    body = []
    for path, s in layers.items():
        row = [names[path], s["r"], s["delta_fro"], s["effective_rank"], s["singular_values"][0]]
        if has_base:
            row += [s["delta_to_base"], s["amplification"]]
        if has_phi:
            phi = s.get("subspace_similarity")
            k = min(len(phi), len(phi[0])) if phi else 0
            row += [phi[0][0], phi[k - 1][k - 1]] if phi else [None, None]
        body.append(row)
    lines = [table(headers, body)]
    if has_phi:
        lines.append(f"phi over: {result['subspace_meaning']}; k = min(r1, r2); random subspaces of "
                     f"R^K give max(i, j)/K on average")
        if result["only_in_adapter"] or result["only_in_against"]:
            lines.append(f"not compared: only in adapter {result['only_in_adapter']}, "
                         f"only in against {result['only_in_against']}")
    if result["skipped"]:
        lines.append(f"skipped (not 2-D lora_A/lora_B pairs): {result['skipped']}")
    return "\n".join(lines)


def short_names(paths: list[str]) -> dict[str, str]:
    """Layer paths without their common leading components ('model.layers.')."""
    parts = [p.split(".") for p in paths]
    n = 0
    while len(paths) > 1 and all(len(p) > n + 1 and p[n] == parts[0][n] for p in parts):
        n += 1
    return {p: ".".join(q[n:]) for p, q in zip(paths, parts)}


# ---- the CLI (python -m compare analyze; compare/__main__.py dispatches here) -------------------------
def add_analyze_parser(sub):
    """The `analyze` subcommand and its flags, on compare's subparsers; returns its parser."""
    p = sub.add_parser("analyze", help="per-layer spectra, effective rank, norms, amplification and "
                                       "subspace similarity of a LoRA adapter (Hu et al. 2021, section 7)")
    p.add_argument("adapter", help="PEFT-format adapter folder (ours or peft's), a run folder holding "
                                   "adapter/, or a hub id")
    p.add_argument("--against", default=None, metavar="ADAPTER2",
                   help="a second adapter: phi(i, j) on the layers both adapt")
    p.add_argument("--subspace", default="A", choices=list(SUBSPACES),
                   help="what phi compares: A = right singular vectors of lora_A (the paper's choice), "
                        "delta_right / delta_left = singular vectors of s*B@A (default: A)")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="the base model (folder, hub id, or builtin:tiny-llama): adds ||dW||/||W|| and "
                        "the amplification factor")
    p.add_argument("--base-seed", type=int, default=DEFAULT_BASE_SEED,
                   help="with --base builtin:tiny-llama: the --seed of the run, which built that "
                        f"model (default: {DEFAULT_BASE_SEED}, train's default)")
    p.add_argument("--out", default="analysis_out",
                   help="folder for analysis.json and the PNGs (default: analysis_out)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier analysis in --out")
    return p


def run_analyze_command(args, progress: Optional[Callable[[str], None]] = None) -> int:
    """Run `analyze` from parsed CLI args, print the per-layer table; CompareError propagates."""
    if args.base is not None:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # the table is the output
    result = analyze(args.adapter, against=args.against, base=args.base, out_dir=args.out,
                     subspace=args.subspace, base_seed=args.base_seed, overwrite=args.overwrite,
                     progress=progress)
    print(format_analysis(result))
    files = [n for n in (ANALYSIS, *PLOTS) if (Path(args.out) / n).exists()]
    print(f"wrote {args.out}/: {', '.join(files)}")
    return 0
