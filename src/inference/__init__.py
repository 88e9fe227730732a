"""Image generation for stampflow: model registry, batching engine, effect node, artifacts."""

from inference.artifacts import ArtifactStore, StoredArtifact, artifact_path
from inference.budget import (
    Footprint,
    ModelShape,
    batch_capacity,
    estimate_footprint,
    read_model_shape,
)
from inference.effect import InferenceEffectNode
from inference.engine import (
    BatchKey,
    GeneratedImage,
    GenerationJob,
    InferenceEngine,
    ItemFailed,
    ItemResult,
    batch_key,
    decode_png,
    encode_png,
    group_jobs,
)
from inference.errors import (
    InferenceError,
    InvalidRequest,
    ModelNotFound,
    OverVramBudget,
    TransientInferenceError,
    UnknownModel,
    UnsupportedConfiguration,
)
from inference.registry import (
    LoadedPipeline,
    ModelRegistry,
    ModelSpec,
    resolve_device,
    resolve_dtype,
)
from inference.tiny import make_tiny_flux

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
