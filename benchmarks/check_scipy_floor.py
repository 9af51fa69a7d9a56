"""Prints every statistic of analysis.stats on fixed data (ties, zeros, small and large n) as JSON.

    PYTHONPATH=<folder with another scipy>:. python benchmarks/check_scipy_floor.py > other.json
    python benchmarks/check_scipy_floor.py > current.json; python benchmarks/check_scipy_floor.py --compare other.json current.json

Run under the oldest scipy pyproject.toml allows and under the pinned one: the numbers must agree
(benchmarks/RESULTS.md, "scipy floor"). This is how the floor was chosen.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def samples() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "normal n=8": rng.normal(0.01, 0.02, 8),
        "normal n=40": rng.normal(0.01, 0.02, 40),
        "normal n=80": rng.normal(0.01, 0.02, 80),
        "ties and zeros n=12": np.array([0.0, 0.0, 0.2, 0.2, -0.1, 0.3, 0.3, 0.3, -0.2, 0.5, 0.4, 0.1]),
        "rounded n=30 (ties)": np.round(rng.normal(0.01, 0.02, 30), 2),
        "skewed n=15": rng.exponential(1.0, 15) - 0.5,
    }


def compute() -> dict:
    import scipy

    from analysis import stats as S

    out = {"scipy": scipy.__version__}
    for name, d in samples().items():
        for preset in ("project", "paper"):
            for interval in ("t", "bootstrap-t", "bca", "percentile"):
                res = S.describe_differences(d, preset, interval=interval, min_n=2, n_resamples=2000)
                out[f"{name} | {preset} | {interval}"] = {k: (None if isinstance(v, float) and np.isnan(v) else v)
                                                           for k, v in res.items()}  # fmt: skip
    return out


def compare(a: dict, b: dict) -> int:
    worst, bad = 0.0, []
    for key in sorted(set(a) - {"scipy"}):
        for stat, va in a[key].items():
            vb = b[key][stat]
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
                rel = abs(va - vb) / max(abs(va), abs(vb), 1e-300)
                worst = max(worst, rel)
                if rel > 1e-9:
                    bad.append(f"{key} {stat}: {va} vs {vb}")
            elif va != vb:
                bad.append(f"{key} {stat}: {va!r} vs {vb!r}")
    print(f"scipy {a['scipy']} vs {b['scipy']}: {sum(len(v) for k, v in a.items() if k != 'scipy')} values, "
          f"largest relative difference {worst:.1e}, {len(bad)} differ by more than 1e-9")  # fmt: skip
    for line in bad[:20]:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":
        sys.exit(compare(json.loads(Path(sys.argv[2]).read_text()), json.loads(Path(sys.argv[3]).read_text())))
    print(json.dumps(compute(), indent=1))
