"""Image generation for stampflow: model registry, batching engine, effect node, artifacts."""

from inference.artifacts import ArtifactStore, StoredArtifact, artifact_path
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
    TransientInferenceError,
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
    "ModelSpec",
    "StoredArtifact",
    "TransientInferenceError",
    "UnsupportedConfiguration",
    "artifact_path",
    "batch_key",
    "decode_png",
    "encode_png",
    "group_jobs",
    "make_tiny_flux",
    "resolve_device",
    "resolve_dtype",
]
