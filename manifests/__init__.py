"""Sweep files: schema, validation, bundled prompt sets, expansion into units and shards. No torch here."""

from manifests.expand import Manifest, config_hash, expand, shard_name, unit_id
from manifests.interventions import PRESETS, Intervention, StepWindow, resolve_preset
from manifests.load import SweepError, parse_sweep, read_sweep_file, resolve_prompts
from manifests.models import Geometry
from manifests.preflight import check_machine, plan_sweep_file
from manifests.prompts import Prompt
from manifests.prompts import load_bundled as load_bundled_prompts
from manifests.schema import (
    AnalysisSpec,
    ArmGridSpec,
    ArmSpec,
    GenerationSpec,
    LocalExecutorConfig,
    ModelSpec,
    PromptSpec,
    RayExecutorConfig,
    RecordingSpec,
    SeedSpec,
    ShardingSpec,
    SlurmExecutorConfig,
    Sweep,
)

# Short aliases used across the packages.
Arm = ArmSpec
Generation = GenerationSpec
Recording = RecordingSpec

__all__ = [name for name in dir() if not name.startswith("_")]
