"""How long `orchestrate plan` takes to answer hostile sweep files (the issue-16 corpus), and how long its answer is.

Prints one line per file: size, seconds to the SweepError, message length, the message's first problem.
CPU only; no model is loaded. Run: `python benchmarks/bench_sweep_limits.py`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from manifests import SweepError, plan_sweep_file

HEAD = "name: hostile\nmodel: {preset: tiny-sd3}\nprompts: {set: geneval, limit: 2}\narms: [{name: baseline}]\n"


def hostile_files(folder: Path) -> dict[str, Path]:
    files: dict[str, bytes] = {}
    bomb = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for parent, child in zip("abcdefgh", "bcdefghi"):
        bomb.append(f"{child}: &{child} [" + ",".join([f"*{parent}"] * 9) + "]")
    files["alias bomb (9 levels)"] = ("\n".join(bomb) + "\n").encode()
    files["7 MB list of prompt ids"] = HEAD.replace("limit: 2", "ids: [" + ", ".join(map(str, range(1_000_000))) + "]").encode()
    files["12 MB of unknown keys"] = (HEAD + "".join(f"unknown_key_{i}: {i}\n" for i in range(500_000))).encode()
    files["20 000 unknown keys"] = (HEAD + "".join(f"unknown_key_{i}: {i}\n" for i in range(20_000))).encode()
    files["20 000 prompt ids"] = HEAD.replace("limit: 2", "ids: [" + ", ".join(map(str, range(20_000))) + "]").encode()
    files["24 000-deep flow nesting"] = (HEAD + "description: " + "[" * 12_000 + "]" * 12_000 + "\n").encode()
    files["500-deep block nesting"] = (HEAD + "description:\n" + "".join("  " * i + "- \n" for i in range(1, 500))).encode()
    files["not UTF-8"] = HEAD.encode() + b"description: caf\xe9\n"
    files["duplicate arms"] = (HEAD + "arms: [{name: other}]\n").encode()
    paths = {}
    for i, (label, data) in enumerate(files.items()):
        path = folder / f"hostile{i}.yaml"
        path.write_bytes(data)
        paths[label] = path
    return paths


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in hostile_files(Path(tmp)).items():
            start = time.perf_counter()
            try:
                plan_sweep_file(path)
                outcome = "ACCEPTED"
            except SweepError as e:
                outcome = str(e)
            seconds = time.perf_counter() - start
            first = outcome.splitlines()[1].strip()[:90] if "\n" in outcome else outcome[:90]
            print(f"{label:28s} {path.stat().st_size / 1e6:6.2f} MB  {seconds:6.3f} s  message {len(outcome):5d} chars  "
                  f"{first}")


if __name__ == "__main__":
    main()
