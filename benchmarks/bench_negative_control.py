"""Negative control: how often are two arms with the same random intervention called different?

Both arms remove k random keys per head in the same layers (`fixed.random`), with independent draws
(`random_seed_offset` 2e and 2e + 1 for experiment e). Nothing separates them but chance, so a calibrated
test rejects "no difference" at about its nominal rate α. For each of `--experiments` experiments the
benchmark forms the paired differences ΔΔ = (arm_a − baseline) − (arm_b − baseline) over the same units
(prompt × seed), runs the project's statistics (`analysis.stats.describe_differences`: paired t-test and
Wilcoxon, two-sided) and counts p < α. Metrics: the mean absolute pixel distance to the baseline image
(a pair metric, like LPIPS) and toy-GenEval (0/1 per image). The false-positive rate comes with a 95 %
Clopper-Pearson interval (scipy.stats.binomtest). All experiments share the units and the baseline images,
so they are not independent; each one alone is a valid null experiment.

    python benchmarks/bench_negative_control.py --experiments 40 --json benchmarks/results/negative-control/toy.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.metrics.toy_geneval import score_image  # noqa: E402
from analysis.stats import describe_differences  # noqa: E402
from manifests.prompts import load_bundled  # noqa: E402
from manifests.schema import ArmSpec, GenerationSpec, ModelSpec, RecordingSpec, SeedSpec  # noqa: E402


def generate(preset: str, prompt_ids: list[int], seeds: int, experiments: int, layers: list[int], steps: int,
             guidance: float, arms_per_batch: int = 1, device: str = "cpu",
             shared_seed: bool = False) -> tuple[list[dict], float]:
    """One row per unit: baseline image and 2 × experiments random-arm images (as float arrays) + toy-GenEval."""
    from workers import generate_group, load_pipeline

    loaded = load_pipeline(ModelSpec(preset=preset), device=device)
    arms = [ArmSpec(name="baseline")] + [
        ArmSpec(name=f"random_{i}", intervention={"preset": "fixed.random", "k": 1, "layers": layers, "random_seed_offset": i})
        for i in range(2 * experiments)
    ]
    generation = GenerationSpec(steps=steps, guidance=guidance, height=64, width=64, arms_per_batch=arms_per_batch)
    prompts = load_bundled("toy-geneval")
    began = time.perf_counter()
    units = []
    rule = SeedSpec(base=42)  # the sweeps' seed rule: every (prompt, seed index) its own group seed
    for pid in prompt_ids:
        for s in range(seeds):
            seed = rule.seed(0 if shared_seed else pid, s)
            results = generate_group(loaded, prompts[pid].text, seed, arms, generation, RecordingSpec())
            images = {r.arm: np.asarray(r.image, dtype=np.float64) / 255.0 for r in results}
            geneval = {r.arm: score_image(r.image, prompts[pid].text) for r in results}
            units.append({"prompt_id": pid, "seed": seed, "images": images, "toy_geneval": geneval})
    return units, time.perf_counter() - began


def null_experiments(units: list[dict], experiments: int, alpha: float) -> dict:
    from scipy.stats import binomtest

    out = {}
    for metric in ("pixel_distance", "toy_geneval"):
        p_t, p_w = [], []
        for e in range(experiments):
            a, b = f"random_{2 * e}", f"random_{2 * e + 1}"
            if metric == "pixel_distance":  # a pair metric: Δ = distance to the unit's baseline image
                da = np.array([np.abs(u["images"][a] - u["images"]["baseline"]).mean() for u in units])
                db = np.array([np.abs(u["images"][b] - u["images"]["baseline"]).mean() for u in units])
            else:  # a unit metric: Δ = arm − baseline
                da = np.array([u["toy_geneval"][a] - u["toy_geneval"]["baseline"] for u in units])
                db = np.array([u["toy_geneval"][b] - u["toy_geneval"]["baseline"] for u in units])
            res = describe_differences(da - db, n_resamples=200)
            p_t.append(res["p_t_two_sided"])
            p_w.append(res["p_wilcoxon_two_sided"])
        summary = {}
        for test, ps in (("t", p_t), ("wilcoxon", p_w)):
            ps = np.array(ps, dtype=np.float64)
            computable = ~np.isnan(ps)  # no variance (e.g. every ΔΔ = 0): nothing to call different
            hits = int((ps[computable] < alpha).sum())
            ci = binomtest(hits, experiments).proportion_ci(0.95, method="exact")
            summary[test] = {"false_positives": hits, "experiments": experiments, "computable": int(computable.sum()),
                             "rate": hits / experiments, "ci95": [ci.low, ci.high]}
        out[metric] = summary
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="toy-sd3")
    ap.add_argument("--prompt-ids", type=int, nargs="+", default=[0, 3, 9, 15, 21, 27], help="toy-geneval prompt ids")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--experiments", type=int, default=40)
    ap.add_argument("--layers", type=int, nargs="+", default=[3])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--arms-per-batch", type=int, default=9, help="arms per pipeline call (generation.arms_per_batch)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shared-seed", action="store_true",
                    help="give every prompt the same group seed (breaks the seed rule: random draws are then shared "
                         "across prompts and the units are not independent; shows what that does to the rate)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    units, seconds = generate(args.preset, args.prompt_ids, args.seeds, args.experiments, args.layers, args.steps, args.guidance,
                              args.arms_per_batch, args.device, args.shared_seed)
    result = {
        "preset": args.preset, "units": len(units), "experiments": args.experiments, "alpha": args.alpha,
        "shared_seed": args.shared_seed, "layers": args.layers, "steps": args.steps, "guidance": args.guidance, "arms_per_batch": args.arms_per_batch,
        "images": len(units) * (1 + 2 * args.experiments), "generation_seconds": round(seconds, 1),
        "device": args.device, "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "false_positive_rate": null_experiments(units, args.experiments, args.alpha),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
