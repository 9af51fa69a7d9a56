"""Every sweep under malformed/ is rejected before anything runs, with a message naming file, key and expectation.

Each file's first line is `# expect: <text>`; the error must contain that text and the file's path.
The check is `plan_sweep_file`, i.e. everything `orchestrate plan` checks, this machine's paths included.
"""

from pathlib import Path

import pytest

from manifests import SweepError, plan_sweep_file

CORPUS = Path(__file__).parent / "malformed"
CASES = sorted(CORPUS.glob("*.yaml"))


def test_corpus_is_large_enough():
    assert len(CASES) >= 100


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_malformed_sweep_is_rejected(path: Path):
    first = path.read_bytes().split(b"\n")[0].decode("utf-8")
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: ...'"
    expected = first.removeprefix("# expect: ")
    with pytest.raises(SweepError) as info:
        plan_sweep_file(path)
    message = str(info.value)
    assert str(path) in message
    assert expected in message, f"\nexpected fragment: {expected}\nactual message:\n{message}"
