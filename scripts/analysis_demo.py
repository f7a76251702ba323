"""A small version of Hu et al. 2021's Figure 3 on the bundled demo: adapters of r=4 and r=16,
two seeds each, and the subspace similarity phi between them (`compare analyze`).

    .venv/bin/python scripts/analysis_demo.py                  # 4 short runs, then the analyses
    .venv/bin/python scripts/analysis_demo.py --max-steps 500 --out runs/analysis_demo_500

The four runs share ONE base model: the bundled tiny Llama is built from a run's --seed, so it is
saved once (seed 42) and every run loads it from that folder; the seed then only changes the LoRA
init, the data order and the train/eval split. Ranks are compared across different seeds only: with the same seed the
first layer's r=4 A starts as the first 4 rows of the r=16 A (the same uniform draws), which
would look like a shared subspace that training did not learn. Runs whose adapter already
exists are not retrained. Prints phi(1, 1) and phi(k, k) (k = min(r1, r2)) averaged over layers,
beside what unrelated random subspaces give (max(i, j) / K), and copies the r=4 vs r=16 heat map
to docs/.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RANKS, SEEDS = (4, 16), (0, 1)


def train_runs(out: Path, max_steps: int) -> dict[tuple[int, int], Path]:
    from train import TrainConfig, run
    from train.models import save_builtin

    base = out / "base"
    if not (base / "config.json").is_file():
        save_builtin(base, seed=42)
    adapters = {}
    for r in RANKS:
        for seed in SEEDS:
            run_dir = out / f"r{r}-seed{seed}"
            if not (run_dir / "adapter" / "adapter_config.json").is_file():
                run(TrainConfig(model=str(base), r=r, lora_alpha=2 * r, seed=seed, max_steps=max_steps,
                                tag_eval_samples=0, num_sample_generations=0, eval_steps=0, save_steps=0,
                                report_to="none", output_dir=str(run_dir)))
            adapters[r, seed] = run_dir / "adapter"
    return adapters


def mean_phi(result: dict) -> tuple[float, float, float, float]:
    """Mean over layers of phi(1, 1), phi(k, k) and their random-subspace values 1/K, k/K."""
    rows = []
    for s in result["layers"].values():
        phi, K = s["subspace_similarity"], s["ambient_dim"]
        k = min(len(phi), len(phi[0]))
        rows.append((phi[0][0], phi[k - 1][k - 1], 1 / K, k / K))
    return tuple(sum(col) / len(col) for col in zip(*rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "analysis_demo"))
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--figure", default=str(ROOT / "docs" / "analysis_phi_r4_vs_r16.png"))
    args = ap.parse_args()
    out = Path(args.out)
    adapters = train_runs(out, args.max_steps)

    import compare
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one line per pair, not a bar per model load

    pairs = {"seeds, r=4": ((4, 0), (4, 1)), "seeds, r=16": ((16, 0), (16, 1)),
             "ranks 4 vs 16 (a)": ((4, 0), (16, 1)), "ranks 4 vs 16 (b)": ((4, 1), (16, 0))}
    print(f"\nmean over layers, {args.max_steps} steps; random = unrelated random subspaces")
    print(f"{'pair':<20} {'subspace':<12} {'phi(1,1)':>9} {'random':>8} {'phi(k,k)':>9} {'random':>8}")
    for label, (a, b) in pairs.items():
        for subspace in ("A", "delta_right"):
            folder = out / "analysis" / f"{label.replace(' ', '_').replace(',', '')}-{subspace}"
            result = compare.analyze(adapters[a], against=adapters[b], subspace=subspace,
                                     base=str(out / "base"), out_dir=folder, overwrite=True)
            p11, pkk, r11, rkk = mean_phi(result)
            print(f"{label:<20} {subspace:<12} {p11:9.3f} {r11:8.4f} {pkk:9.3f} {rkk:8.4f}")
            if label == "ranks 4 vs 16 (a)" and subspace == "A":
                figure = Path(args.figure)
                figure.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / "subspace_similarity.png", figure)
    for r in RANKS:
        s = compare.analyze(adapters[r, 0], base=str(out / "base"))["summary"]
        print(f"r={r:<3} seed 0: mean effective rank {s['mean_effective_rank']:.2f}, mean ||dW||/||W|| "
              f"{s['mean_delta_to_base']:.3f}, mean amplification {s['mean_amplification']:.1f}")
    print(f"heat map (r=4 seed 0 vs r=16 seed 1, A): {args.figure}")


if __name__ == "__main__":
    main()
