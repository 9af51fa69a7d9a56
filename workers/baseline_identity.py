"""Everything that determines a unit's pixels and records, as plain data (the unit cache's identity).

A baseline's identity is `baseline_identity`; an intervened unit's is its group's baseline identity plus what
`manifests.grouping.chunk_identity` adds (its resolved intervention, and the whole batch when it ran batched):
`unit_identity`. The processors' code is in `code_version`, so a change to how an intervention computes
never reuses an old image.

`jobs.baseline_cache` hashes this dict into an entry key, so two baselines share an entry only if every field
here is equal: the model's weights (a hub snapshot's commit and its files' content hashes, a local folder's
file hashes, or a random preset's name), load_t5, dtype, the device kind, the torch / diffusers / transformers
versions, the workers' code (every source file of this package and the manifests modules that define what an
intervention and a record compute, so a processor, recorder or intervention change never reuses an old image),
the prompt text, the seed, the generation settings that reach the pipeline, the scheduler's
class and config, and the recording spec. Over-keying costs a regeneration; under-keying would reuse a wrong
image, so when in doubt a field is in.

Also here: (de)serialising the captured latents, which the cache stores as opaque bytes.
"""

from __future__ import annotations

import hashlib
import json
import platform
from functools import lru_cache
from pathlib import Path

import torch

from manifests.grouping import chunk_identity
from manifests.schema import GenerationSpec, ModelSpec, RecordingSpec
from workers.loading import LoadedPipeline

_CODE_SUFFIXES = (".py", ".cu", ".cpp", ".h", ".cuh")
# modules outside workers/ whose code decides what a unit computes: an intervention's active steps and prefix start
# (interventions), the key layout and regions in the sink records (keys), which arms share a batch (grouping),
# the models' geometry and layer addressing (models)
_MANIFEST_CODE = ("interventions.py", "keys.py", "grouping.py", "models.py")


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over the workers package's source files and the manifests modules in _MANIFEST_CODE (path and
    content), in path order."""
    root = Path(__file__).resolve().parent
    repo = root.parent
    files = [p for p in root.rglob("*") if p.suffix in _CODE_SUFFIXES and "__pycache__" not in p.parts]
    files += [repo / "manifests" / name for name in _MANIFEST_CODE]
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.relative_to(repo).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def device_kind(device: str) -> str:
    """The hardware the numbers come from: the GPU's name and capability, or the CPU's ISA level and threads."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{torch.cuda.get_device_name(index)}:sm{major}{minor}:cuda{torch.version.cuda}"
    # CPU kernels dispatch on the ISA; their reduction splits may follow the thread count
    return f"{dev.type}:{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}:threads{torch.get_num_threads()}"


@lru_cache(maxsize=8)
def _folder_hashes(folder: str, stamp: tuple) -> dict[str, str]:
    """sha256 of every file of a local model folder (memoised per process on the files' sizes and mtimes)."""
    root = Path(folder)
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        out[path.relative_to(root).as_posix()] = digest.hexdigest()
    return out


def _folder_stamp(folder: Path) -> tuple:
    return tuple(sorted((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in folder.rglob("*") if p.is_file()))


def model_weights_identity(model: ModelSpec) -> dict:
    if model.path is not None:  # a folder can change under the same spec: re-stat it (hashes are memoised on the stats)
        return _weights_identity(model)
    return json.loads(_model_weights_identity_json(model.model_dump_json()))


@lru_cache(maxsize=8)
def _model_weights_identity_json(model_json: str) -> str:  # once per process and model (hashing can take seconds)
    return json.dumps(_weights_identity(ModelSpec.model_validate_json(model_json)))


def _weights_identity(model: ModelSpec) -> dict:
    """Which weights: a preset's name; a hub snapshot's commit and per-file blob hashes; a folder's file hashes."""
    if model.preset is not None:
        return {"preset": model.preset}  # built by this package's code (in code_version) from fixed seeds
    if model.hub_id is not None:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(model.hub_id, revision=model.revision, local_files_only=True))
        # the HF cache links each file to blobs/<etag>; an LFS file's etag is its sha256
        files = {p.relative_to(snapshot).as_posix(): Path(p).resolve().name for p in sorted(snapshot.rglob("*")) if p.is_file()}
        return {"hub_id": model.hub_id, "commit": snapshot.name, "files": files}
    folder = Path(model.path).resolve()
    return {"path": str(folder), "files": _folder_hashes(str(folder), _folder_stamp(folder))}


def baseline_identity(loaded: LoadedPipeline, model: ModelSpec, prompt: str, seed: int, generation: GenerationSpec,
                      recording: RecordingSpec) -> dict:
    """The cache identity of the baseline (intervention: none) of one (prompt, seed) group of this run."""
    import diffusers
    import transformers

    from workers.generate import make_scheduler, resolution

    scheduler = make_scheduler(loaded.pipe, generation.scheduler)
    height, width = resolution(loaded, generation)
    return {
        "model": model_weights_identity(model),
        "load_t5": model.load_t5,
        "family": loaded.family,
        "dtype": str(loaded.dtype),
        "device": device_kind(loaded.device),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "code": code_version(),
        "prompt": prompt,
        "seed": seed,
        # arms_per_batch and prefix_sharing are left out: a baseline always runs alone (workers.generate)
        "generation": generation.model_dump(mode="json", exclude={"arms_per_batch", "prefix_sharing"}) | {"height": height, "width": width},
        "scheduler": {"class": type(scheduler).__name__, "config": dict(scheduler.config)},
        "recording": recording.model_dump(mode="json"),
    }


def unit_identity(group_identity: dict, chunk: list, position: int, step: int, num_steps: int) -> dict:
    """The cache identity of intervened arm `chunk[position]`, run in `chunk` from step `step` (group_plan's
    call) of `num_steps`, in the group whose baseline identity is `group_identity` (a baseline identity needs no
    baseline arm)."""
    return {**group_identity, "unit": chunk_identity(chunk, position, step, num_steps)}


def latents_to_bytes(trajectory: dict[int, torch.Tensor], final: torch.Tensor, sigmas: list[float]) -> bytes:
    """safetensors bytes: `step_<i>` = latents entering step i, `final` = after the last step, `sigmas` = the
    run's schedule (a sigma window's start step needs it). CPU copies, dtype kept."""
    from safetensors.torch import save

    tensors = {f"step_{i}": t.detach().to("cpu").contiguous() for i, t in sorted(trajectory.items())}
    tensors["final"] = final.detach().to("cpu").contiguous()
    tensors["sigmas"] = torch.tensor(sigmas, dtype=torch.float64)
    return save(tensors)


def latents_from_bytes(data: bytes) -> tuple[dict[int, torch.Tensor], torch.Tensor, list[float]]:
    """(step -> latents entering it, final latents, sigmas): the inverse of latents_to_bytes."""
    from safetensors.torch import load

    tensors = load(data)
    final, sigmas = tensors.pop("final"), tensors.pop("sigmas").tolist()
    return {int(name.split("_", 1)[1]): t for name, t in tensors.items()}, final, sigmas
