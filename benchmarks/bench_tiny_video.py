"""Seconds per video of the tiny video presets on the CPU (the test and CI budget): build, then whole groups.

    python benchmarks/bench_tiny_video.py [--repeats 5]

For each of tiny-wan (64², 5 frames) and tiny-ltx-video (64², 9 frames): the build time of the preset, and the median
seconds of one baseline video (2 steps, CFG, decode, frame strip) through `workers.generate_group`, without and with
recording every attention layer (top-3, mass + ratio). Numbers only; no assertions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from manifests import ArmSpec, GenerationSpec, ModelSpec, RecordingSpec
from workers import generate_group, load_pipeline

SETTINGS = {
    "tiny-wan": (GenerationSpec(steps=2, guidance=5.0, num_frames=5, max_sequence_length=32), "blocks.*"),
    "tiny-ltx-video": (GenerationSpec(steps=2, guidance=3.0, num_frames=9, max_sequence_length=32), "transformer_blocks.*"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as every shard runs (generation.torch_threads: 1)
    print("| preset | frames | build s | s / video (no recording) | s / video (all layers recorded) |")
    print("|---|---|---|---|---|")
    for preset, (generation, pattern) in SETTINGS.items():
        started = time.perf_counter()
        loaded = load_pipeline(ModelSpec(preset=preset), device="cpu")
        build = time.perf_counter() - started
        row = []
        for recording in (RecordingSpec(), RecordingSpec(layers=[pattern], topk=3, stats=["mass", "ratio"])):
            times = []
            for seed in range(args.repeats + 1):  # the first call warms up
                started = time.perf_counter()
                generate_group(loaded, "a photo of a cat and a dog", seed, [ArmSpec(name="base")], generation, recording)
                times.append(time.perf_counter() - started)
            row.append(statistics.median(times[1:]))
        print(f"| {preset} | {generation.num_frames} | {build:.2f} | {row[0]:.3f} | {row[1]:.3f} |")


if __name__ == "__main__":
    main()
