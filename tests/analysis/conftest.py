"""Fixtures for the analysis tests: a fake run directory on disk (no mocks)."""

from __future__ import annotations

import pytest

from analysis_fakerun import FakeRunSpec, make_run


@pytest.fixture
def fake_run(tmp_path):
    """Factory: ``fake_run(**spec_fields)`` → path of a fresh run directory."""

    def build(**kwargs):
        return make_run(tmp_path / f"run{len(list(tmp_path.iterdir()))}", FakeRunSpec(**kwargs))

    return build


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """One run directory with LPIPS already computed, shared by read-only tests."""
    from analysis import compute_metrics

    run = make_run(tmp_path_factory.mktemp("shared"), FakeRunSpec())
    compute_metrics(run, ["lpips"], random_weights=True)
    return run


@pytest.fixture(autouse=True)
def _no_weights_dir(monkeypatch, tmp_path):
    """Point the weight layout at an empty folder so no test picks up a real cache, and never
    reach the network whatever a library tries."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("SINKSCOPE_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
