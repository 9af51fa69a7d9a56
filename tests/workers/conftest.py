import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny paths never touch the hub; a stray call fails at once
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tokenizer files are rebuilt into a fresh cache, so the build itself is exercised.

    SINKSCOPE_TEST_SHARED_CACHE=1 keeps $SINKSCOPE_CACHE (the GPU machine has no open_clip; a prebuilt cache travels).
    """
    if os.environ.get("SINKSCOPE_TEST_SHARED_CACHE") == "1":
        yield
        return
    old = os.environ.get("SINKSCOPE_CACHE")
    os.environ["SINKSCOPE_CACHE"] = str(tmp_path_factory.mktemp("sinkscope-cache"))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    yield
    if old is None:
        os.environ.pop("SINKSCOPE_CACHE", None)
    else:
        os.environ["SINKSCOPE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_loaded(_private_cache):
    from manifests import ModelSpec
    from workers import load_pipeline

    return load_pipeline(ModelSpec(preset="tiny-sd3"), device="cpu")


def _load_tiny(preset: str):
    from manifests import ModelSpec
    from workers import load_pipeline

    # model_construct: presets the manifests geometry table may not list yet are checked against the build only
    spec = ModelSpec.model_construct(preset=preset, hub_id=None, path=None, revision=None, dtype="fp32", device=None, load_t5=True)
    return load_pipeline(spec, device="cpu")


@pytest.fixture(scope="session")
def tiny35_loaded(_private_cache):
    return _load_tiny("tiny-sd35")


@pytest.fixture(scope="session")
def tiny_xl_loaded(_private_cache):
    return _load_tiny("tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_flux_loaded(_private_cache):
    return _load_tiny("tiny-flux")


@pytest.fixture(scope="session")
def tiny_pixart_loaded(_private_cache):
    return _load_tiny("tiny-pixart")


def _tiny_fixture(preset: str):
    """A session fixture loading `preset` (one line per preset below)."""
    @pytest.fixture(scope="session")
    def loaded(_private_cache):
        return _load_tiny(preset)

    return loaded


tiny_qwen_image_loaded = _tiny_fixture("tiny-qwen-image")
tiny_z_image_loaded = _tiny_fixture("tiny-z-image")
