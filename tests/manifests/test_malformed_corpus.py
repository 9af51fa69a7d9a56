"""Every sweep under malformed/ is rejected before anything runs, with a message naming file, key and expectation.

Each file's first line is `# expect: <text>`; the error must contain that text and the file's path.
"""

from pathlib import Path

import pytest

from manifests import SweepError, read_sweep_file

CORPUS = Path(__file__).parent / "malformed"
CASES = sorted(CORPUS.glob("*.yaml"))


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_malformed_sweep_is_rejected(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: ...'"
    expected = first.removeprefix("# expect: ")
    with pytest.raises(SweepError) as info:
        read_sweep_file(path)
    message = str(info.value)
    assert str(path) in message
    assert expected in message, f"\nexpected fragment: {expected}\nactual message:\n{message}"
