"""Image generation for stampflow: model registry, batching engine, effect node, artifacts."""

from stampflow.inference.artifacts import ArtifactStore, StoredArtifact, artifact_path
from stampflow.inference.budget import (
    Footprint,
    ModelShape,
    batch_capacity,
    estimate_footprint,
    read_model_shape,
)
from stampflow.inference.effect import InferenceEffectNode
from stampflow.inference.engine import InferenceEngine, decode_png, encode_png
from stampflow.inference.errors import (
    InferenceError,
    InvalidRequest,
    ModelNotFound,
    OverVramBudget,
    TransientInferenceError,
    UnknownModel,
    UnsupportedConfiguration,
)
from stampflow.inference.jobs import (
    BatchKey,
    GeneratedImage,
    GenerationJob,
    ItemFailed,
    ItemResult,
    batch_key,
    group_jobs,
)
from stampflow.inference.registry import (
    LoadedPipeline,
    ModelRegistry,
    ModelSpec,
    resolve_device,
    resolve_dtype,
)
from stampflow.inference.tiny import make_tiny_flux

__all__ = [
    "ArtifactStore",
    "BatchKey",
    "Footprint",
    "GeneratedImage",
    "GenerationJob",
    "InferenceEffectNode",
    "InferenceEngine",
    "InferenceError",
    "InvalidRequest",
    "ItemFailed",
    "ItemResult",
    "LoadedPipeline",
    "ModelNotFound",
    "ModelRegistry",
    "ModelShape",
    "ModelSpec",
    "OverVramBudget",
    "StoredArtifact",
    "TransientInferenceError",
    "UnknownModel",
    "UnsupportedConfiguration",
    "artifact_path",
    "batch_capacity",
    "batch_key",
    "decode_png",
    "encode_png",
    "estimate_footprint",
    "group_jobs",
    "make_tiny_flux",
    "read_model_shape",
    "resolve_device",
    "resolve_dtype",
]
