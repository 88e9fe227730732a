"""Model names → local pipelines. Nothing is downloaded: a model is a local folder or a
Hugging Face repo id already in the local HF cache (``local_files_only=True``)."""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from inference.errors import (
    InferenceError,
    ModelNotFound,
    TransientInferenceError,
    UnsupportedConfiguration,
)

DevicePolicy = Literal["auto", "cuda", "cpu"]
DtypePolicy = Literal["auto", "bfloat16", "float16", "float32"]
Quantization = Literal["nf4"]

DEFAULT_MODELS: Mapping[str, str] = {
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Where a model lives: a local folder or a HF repo id, and how to load it."""

    source: str
    pipeline_class: str = "FluxPipeline"
    quantization: Quantization | None = None


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    name: str
    path: Path
    spec: ModelSpec


@dataclass(frozen=True, slots=True)
class LoadedPipeline:
    name: str
    pipeline: Any  # a diffusers DiffusionPipeline
    pipeline_class: str
    path: Path
    device: str
    dtype: str


def resolve_device(policy: DevicePolicy | None, cuda_available: bool) -> str:
    """``auto`` → cuda when available, else cpu. An explicit ``cuda`` without CUDA is an error."""
    if policy in (None, "auto"):
        return "cuda" if cuda_available else "cpu"
    if policy == "cuda" and not cuda_available:
        raise UnsupportedConfiguration("device 'cuda': CUDA is not available on this machine")
    return policy


def resolve_dtype(policy: DtypePolicy | None, device: str) -> str:
    """``auto`` → bfloat16 on CUDA, float32 on CPU; an explicit dtype is kept."""
    if policy in (None, "auto"):
        return "bfloat16" if device == "cuda" else "float32"
    return policy


def _pipeline_type(name: str) -> Any:
    import diffusers

    cls = getattr(diffusers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, diffusers.DiffusionPipeline):
        raise UnsupportedConfiguration(
            f"pipeline class {name!r}: not a diffusers pipeline class (e.g. 'FluxPipeline', "
            "'StableDiffusionPipeline')"
        )
    return cls


class ModelRegistry:
    """Resolves and loads pipelines, caching each loaded one by name.

    ``models`` maps names to :class:`ModelSpec`, a folder or a repo id. A name not in the
    mapping is tried as a folder path, then as a repo id (``owner/name``).
    """

    def __init__(
        self,
        models: Mapping[str, ModelSpec | str | Path] | None = None,
        *,
        device: DevicePolicy | None = "auto",
        dtype: DtypePolicy | None = "auto",
        cache_dir: Path | None = None,
    ) -> None:
        merged: dict[str, ModelSpec | str | Path] = {**DEFAULT_MODELS, **(models or {})}
        self.models: dict[str, ModelSpec] = {
            name: spec if isinstance(spec, ModelSpec) else ModelSpec(str(spec))
            for name, spec in merged.items()
        }
        self.device_policy = device
        self.dtype_policy = dtype
        self.cache_dir = cache_dir
        self._loaded: dict[str, LoadedPipeline] = {}
        self._lock = threading.Lock()

    def register(self, name: str, spec: ModelSpec | str | Path) -> None:
        self.models[name] = spec if isinstance(spec, ModelSpec) else ModelSpec(str(spec))
        self._loaded.pop(name, None)

    def spec_for(self, name: str) -> ModelSpec:
        spec = self.models.get(name)
        if spec is not None:
            return spec
        if Path(name).exists() or "/" in name:
            return ModelSpec(name)
        raise ModelNotFound(
            f"model {name!r}: not registered (known: {', '.join(sorted(self.models))}) "
            "and not a folder or repo id"
        )

    def resolve(self, name: str) -> ResolvedModel:
        """The local folder holding model ``name``. Reads the file system only; loads nothing."""
        spec = self.spec_for(name)
        folder = Path(spec.source).expanduser()
        if folder.is_dir():
            if not (folder / "model_index.json").is_file():
                raise ModelNotFound(
                    f"model {name!r}: folder {folder} has no model_index.json"
                )
            return ResolvedModel(name, folder, spec)
        if spec.source.startswith((".", "/", "~")) or spec.source.count("/") != 1:
            raise ModelNotFound(f"model {name!r}: folder {folder} does not exist")
        return ResolvedModel(name, self._from_hf_cache(name, spec.source), spec)

    def _from_hf_cache(self, name: str, repo_id: str) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            path = snapshot_download(repo_id, local_files_only=True, cache_dir=self.cache_dir)
        except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
            where = self.cache_dir or "the default cache"
            raise ModelNotFound(
                f"model {name!r}: repo {repo_id!r} is not in the local Hugging Face cache "
                f"({where}); nothing is downloaded at run time"
            ) from None
        return Path(path)

    def load(self, name: str) -> LoadedPipeline:
        """Load (once) and return the pipeline for ``name`` on the policy's device and dtype."""
        with self._lock:
            cached = self._loaded.get(name)
            if cached is not None:
                return cached
            loaded = self._load(self.resolve(name))
            self._loaded[name] = loaded
            return loaded

    def loaded(self) -> list[str]:
        return sorted(self._loaded)

    def _load(self, model: ResolvedModel) -> LoadedPipeline:
        import torch
        from diffusers.utils import logging as diffusers_logging

        # A service logs structured lines; the per-component loading bar is noise there.
        diffusers_logging.disable_progress_bar()
        device = resolve_device(self.device_policy, torch.cuda.is_available())
        dtype = resolve_dtype(self.dtype_policy, device)
        cls = _pipeline_type(model.spec.pipeline_class)
        kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "local_files_only": True}
        if model.spec.quantization == "nf4":
            kwargs["quantization_config"] = _nf4_config(model.name, device)
        try:
            pipe = cls.from_pretrained(model.path, **kwargs)
        except InferenceError:
            raise
        except OSError as err:
            raise TransientInferenceError(
                f"model {model.name!r}: cannot load from {model.path}: {_one_line(err)}"
            ) from err
        except (ValueError, TypeError, KeyError) as err:
            raise UnsupportedConfiguration(
                f"model {model.name!r}: {model.spec.pipeline_class} cannot load {model.path}: "
                f"{_one_line(err)}"
            ) from err
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return LoadedPipeline(model.name, pipe, model.spec.pipeline_class, model.path,
                              device, dtype)


def _nf4_config(name: str, device: str) -> Any:
    if device != "cuda":
        raise UnsupportedConfiguration(f"model {name!r}: NF4 quantisation needs CUDA")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UnsupportedConfiguration(
            f"model {name!r}: NF4 quantisation needs the bitsandbytes package"
        )
    import torch

    diffusers: Any = importlib.import_module("diffusers")
    return diffusers.PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                      "bnb_4bit_compute_dtype": torch.bfloat16},
        components_to_quantize=["transformer", "text_encoder_2"],
    )


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] or type(err).__name__
