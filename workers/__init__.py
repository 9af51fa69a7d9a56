"""Workers: load a diffusers pipeline, identify attention sinks, intervene, record; never write files.

Public API (what jobs calls): load_pipeline, LoadedPipeline, generate_group, ArmResult, SINK_STEP_SCHEMA,
ReusedBaseline, ReusedUnit and prefix_latents_needed (reuse of cached units; workers.baseline_identity: the cache identity);
verify_sweep (what `orchestrate verify` calls) checks a sweep's arms on the loaded model.
"""

from workers.generate import ArmResult, ReusedBaseline, ReusedUnit, generate_group, latents_needed, prefix_latents_needed
from workers.loading import LoadedPipeline, ModelNotAvailableError, load_pipeline
from workers.recorder import SINK_STEP_SCHEMA
from workers.verify import verify_sweep

__all__ = ["ReusedBaseline", "ReusedUnit", "latents_needed", "prefix_latents_needed", "load_pipeline", "LoadedPipeline", "ModelNotAvailableError", "generate_group", "ArmResult", "SINK_STEP_SCHEMA", "verify_sweep"]
