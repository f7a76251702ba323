"""A small version of Hu et al. 2021's Figure 3 on the bundled demo, through `compare sweep`:
adapters of r=4 and r=16, two seeds each, and the subspace similarity phi between them.

    .venv/bin/python scripts/analysis_demo.py                  # 4 runs of 200 steps, then the analyses
    .venv/bin/python scripts/analysis_demo.py --max-steps 500 --out runs/analysis_demo_500

It saves the bundled tiny Llama once (seed 42) as OUT/base, then runs what these commands run:

    python -m compare sweep --set model=OUT/base --set lora_alpha=8 --set cpu_threads=1 --set seed=0 --seeds 2 \
        --grid r=4,16 --max-steps 200 --analyze-against seed=0 --out OUT          # trains 4 runs
    python -m compare sweep ...the same... --analyze-against r=16,seed=1          # trains nothing
    python -m compare sweep ...the same... --analyze-against r=16,seed=0          # trains nothing

One shared base: the bundled model is otherwise built from each run's seed, and the seed should
only change the LoRA init, the data order and the eval split. lora_alpha is fixed, as in the
paper (alpha = the first r tried, then left alone). Ranks are compared across different seeds:
with the same seed the first layer's r=4 A starts as the first 4 rows of the r=16 A (the same
uniform draws), which would look like a shared subspace that training did not learn. The second
and third sweeps reuse the finished runs (resume) and only analyse them against another reference.
Prints phi(1, 1) and the mean of phi(i, i) over i <= min(r1, r2), averaged over layers, beside what
unrelated random subspaces give (1/K and the mean of i/K), and copies the r=4 seed 0 vs r=16 seed
1 heat map to docs/.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "analysis_demo"))
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--figure", default=str(ROOT / "docs" / "analysis_phi_r4_vs_r16.png"))
    args = ap.parse_args()
    out = Path(args.out)

    import transformers

    import compare
    from train.models import save_builtin

    transformers.utils.logging.disable_progress_bar()
    base = out / "base"
    if not (base / "config.json").is_file():
        save_builtin(base, seed=42)
    # cpu_threads=1: a saved tiny model gets torch's default threads, which only spin on its tiny matmuls
    config = {"model": str(base), "lora_alpha": 8, "seed": 0, "cpu_threads": 1}
    say = lambda msg: print(f"[sweep] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    def sweep(reference: str) -> dict[tuple[int, int], dict]:
        rows = compare.sweep(config, {"r": [4, 16]}, out_dir=out, max_steps=args.max_steps, seeds=2,
                             analyze_against=reference, progress=say)
        bad = compare.ablation.failed(rows)
        if bad:
            sys.exit(f"error: {len(bad)} run(s) failed: {[r['error'] for r in bad]}")
        return {(r["r"], r["seed"]): r for r in rows}

    by_seed, vs_16_1, vs_16_0 = sweep("seed=0"), sweep("r=16,seed=1"), sweep("r=16,seed=0")
    pairs = [("r=4 vs r=16, other seeds (mean of 2 pairs)", [vs_16_1[4, 0], vs_16_0[4, 1]]),
             ("r=4, seed 0 vs 1", [by_seed[4, 1]]), ("r=16, seed 0 vs 1", [by_seed[16, 1]])]
    one_over_k = _mean_inverse_width(Path(by_seed[4, 1]["output_dir"]))
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    print(f"\nmean over layers, {args.max_steps} steps; random = unrelated random subspaces")
    print(f"| pair (phi over A's right singular vectors) | phi(1,1) | random | phi(i,i), i <= min(r1, r2) | random |")
    print("|---|---|---|---|---|")
    for label, rows in pairs:
        print(f"| {label} | {mean(rows, 'phi_11'):.2f} | {one_over_k:.3f} | {mean(rows, 'phi_diag'):.2f} "
              f"| {mean(rows, 'phi_random'):.3f} |")
    for r in (4, 16):
        run = Path(by_seed[r, 0]["output_dir"])
        s = compare.analyze(run / "adapter", base=str(base))["summary"]
        print(f"r={r:<3} seed 0: mean effective rank {s['mean_effective_rank']:.2f}, mean ||dW||/||W|| "
              f"{s['mean_delta_to_base']:.3f}, mean amplification {s['mean_amplification']:.1f}")
    heat = Path(vs_16_1[4, 0]["output_dir"]) / "analysis" / Path(vs_16_1[16, 1]["output_dir"]).name
    figure = Path(args.figure)
    figure.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(heat / "subspace_similarity.png", figure)
    print(f"heat map (r=4 seed 0 vs r=16 seed 1, A): {figure}")


def _mean_inverse_width(run: Path) -> float:
    """1/K averaged over the layers of one of the run's analyses: phi(1, 1) of random subspaces."""
    analysis = next(p for p in (run / "analysis").glob("*/analysis.json") if p.parent.name != "self")
    widths = [s["ambient_dim"] for s in json.loads(analysis.read_text())["layers"].values()]
    return sum(1 / k for k in widths) / len(widths)


if __name__ == "__main__":
    main()
