"""A rough GPU-time estimate for `orchestrate plan`, from the step costs measured in benchmarks/RESULTS.md.

Measured on one H100 (docs/performance-notes.md): SD3-medium transformer step at 1024² with CFG
54.5 ms, VAE decode 91 ms. Cost is scaled linearly with the number of tokens (attention is a minor
share at 1024²); the tiny random models run on a CPU at about 30 ms per step, the toy model (397 keys) at about 0.27 s.
"""

from __future__ import annotations

from manifests import Sweep
from manifests.models import MODEL_NOTES, REAL_SCALE_PRESETS

H100_SD3_STEP_S = 0.0545  # 4096 image + 333 text tokens, batch 2
H100_VAE_1024_S = 0.091
REFERENCE_TOKENS = 4096 + 333
CPU_TINY_STEP_S = 0.03
CPU_TOY_STEP_S = 0.27  # toy-sd3, 64², CFG: 45 CPU-s for 17 images × 10 steps (benchmarks/RESULTS.md, toy model)


def seconds_per_image(sweep: Sweep) -> tuple[float, str]:
    geometry = sweep.model.geometry()
    height, width = sweep.resolution()
    steps = sweep.generation.steps
    if sweep.model.preset in MODEL_NOTES:  # the toy presets (trained, CPU-sized)
        return steps * CPU_TOY_STEP_S + 0.1, "CPU (toy model)"
    if geometry is not None and geometry.random_weights and sweep.model.preset not in REAL_SCALE_PRESETS:
        return steps * CPU_TINY_STEP_S + 0.05, "CPU (tiny random model)"
    tokens = geometry.total_tokens(height, width) if geometry else REFERENCE_TOKENS
    layers = geometry.num_layers if geometry else 24
    step = H100_SD3_STEP_S * (tokens / REFERENCE_TOKENS) * (layers / 24)
    return steps * step + H100_VAE_1024_S * (height * width) / 1024**2, "H100 GPU"


def describe(sweep: Sweep, num_units: int) -> str:
    per_image, device = seconds_per_image(sweep)
    total = per_image * num_units
    unit = f"{total / 3600:.2f} GPU-hours" if device.endswith("GPU") else f"{total / 60:.1f} CPU-minutes"
    return (
        f"estimate: ≈{per_image:.2f} s per image on {device} → ≈{unit} for {num_units} images "
        f"(stock generation cost; sink recording adds ≈5–25 %, see benchmarks/RESULTS.md)"
    )
