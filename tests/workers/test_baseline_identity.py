"""The baseline cache identity: every input that changes a baseline's pixels or records changes it."""

from __future__ import annotations

import os

from jobs.baseline_cache import identity_key
from manifests.schema import GenerationSpec, ModelSpec, RecordingSpec
from workers.baseline_identity import baseline_identity, model_weights_identity


def test_a_local_folder_is_identified_by_its_files_content(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    weights = tmp_path / "transformer" / "w.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"a" * 100)
    spec = ModelSpec.model_construct(preset=None, hub_id=None, path=str(tmp_path), revision=None, dtype="fp32", device=None,
                                     load_t5=True)
    first = model_weights_identity(spec)
    assert set(first["files"]) == {"model_index.json", "transformer/w.safetensors"}
    weights.write_bytes(b"b" * 100)
    os.utime(weights, ns=(1, 1))  # same size, other mtime: the memo is keyed by both
    assert model_weights_identity(spec)["files"] != first["files"]


def test_baseline_identity_follows_what_changes_pixels(tiny_loaded):
    spec = ModelSpec(preset="tiny-sd3")
    gen, rec = GenerationSpec(steps=2, height=64, width=64), RecordingSpec(layers=[0])

    def key(**kw):
        args = dict(prompt="a cat", seed=1, generation=gen, recording=rec) | kw
        return identity_key(baseline_identity(tiny_loaded, spec, args["prompt"], args["seed"], args["generation"], args["recording"]))

    base = key()
    assert key() == base
    # batching and prefix sharing never touch a baseline (it runs alone); everything else does
    assert key(generation=gen.model_copy(update={"arms_per_batch": 3, "prefix_sharing": False})) == base
    assert len({base, key(prompt="a dog"), key(seed=2), key(generation=gen.model_copy(update={"guidance": 6.0})),
                key(generation=gen.model_copy(update={"compile": "inductor"})), key(recording=RecordingSpec(layers=[1]))}) == 6
