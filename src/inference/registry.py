"""Model names → local pipelines. Nothing is downloaded: a model is a local folder or a
Hugging Face repo id already in the local HF cache (``local_files_only=True``).

A request names a *registered* model (the built-ins and ``STAMPFLOW_MODELS``), never a folder
or a repo id. Loaded pipelines are cached by what a name resolves to (the canonical folder), so
two names for one model load it once, in an LRU of at most ``max_loaded`` pipelines; an evicted
pipeline is released (and the CUDA cache emptied). With a VRAM budget, a model whose weights
cannot fit is never loaded (see :mod:`inference.budget`).
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stampflow.inference.budget import ModelShape, estimate_footprint, mib, read_model_shape
from stampflow.inference.errors import (
    InferenceError,
    ModelNotFound,
    OverVramBudget,
    TransientInferenceError,
    UnknownModel,
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


# What a loaded pipeline is cached by: canonical folder, pipeline class, quantisation.
ModelKey = tuple[str, str, str | None]
NF4_COMPONENTS = ("transformer", "text_encoder_2")


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    name: str
    path: Path
    spec: ModelSpec

    @property
    def key(self) -> ModelKey:
        return (os.path.realpath(self.path), self.spec.pipeline_class, self.spec.quantization)


@dataclass(frozen=True, slots=True)
class LoadedPipeline:
    name: str
    pipeline: Any  # a diffusers DiffusionPipeline
    pipeline_class: str
    path: Path
    device: str
    dtype: str
    weights_bytes: int = 0  # on CUDA measured after loading, else estimated from the files
    shape: ModelShape | None = None  # what the activation estimate needs


def resolve_device(policy: DevicePolicy | None, cuda_available: bool) -> str:
    """``auto`` → cuda when available, else cpu. An explicit ``cuda`` without CUDA is an error."""
    if policy in (None, "auto"):
        return "cuda" if cuda_available else "cpu"
    if policy == "cuda" and not cuda_available:
        raise UnsupportedConfiguration("device 'cuda': CUDA is not available on this machine")
    return policy


def runtime_device(policy: DevicePolicy | None) -> str:
    """The device ``policy`` resolves to on this machine (imports torch)."""
    import torch

    return resolve_device(policy, torch.cuda.is_available())


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
    """Resolves registered names and loads pipelines into a bounded LRU cache.

    ``models`` maps names to :class:`ModelSpec`, a folder or a repo id; only those names (and
    the built-ins) resolve. ``max_loaded`` pipelines stay loaded at most (1 by default: one FLUX
    fills a GPU). ``vram_budget_bytes`` caps the estimated weights of the loaded pipelines.
    """

    def __init__(
        self,
        models: Mapping[str, ModelSpec | str | Path] | None = None,
        *,
        device: DevicePolicy | None = "auto",
        dtype: DtypePolicy | None = "auto",
        cache_dir: Path | None = None,
        max_loaded: int = 1,
        vram_budget_bytes: int | None = None,
    ) -> None:
        merged: dict[str, ModelSpec | str | Path] = {**DEFAULT_MODELS, **(models or {})}
        self.models: dict[str, ModelSpec] = {
            name: spec if isinstance(spec, ModelSpec) else ModelSpec(str(spec))
            for name, spec in merged.items()
        }
        if max_loaded < 1:
            raise ValueError(f"max_loaded {max_loaded} is not at least 1")
        self.device_policy = device
        self.dtype_policy = dtype
        self.cache_dir = cache_dir
        self.max_loaded = max_loaded
        self.vram_budget_bytes = vram_budget_bytes
        self.loads: list[str] = []  # the canonical folder of every load from disk, in order
        self._loaded: OrderedDict[ModelKey, LoadedPipeline] = OrderedDict()
        self._lock = threading.Lock()

    def spec_for(self, name: str) -> ModelSpec:
        spec = self.models.get(name)
        if spec is not None:
            return spec
        known = sorted(self.models)
        shown = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
        raise UnknownModel(
            f"model {_shown(name)}: not registered (a request names a registered model, never "
            f"a folder or repo id; registered: {shown})"
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
        """The pipeline for ``name`` on the policy's device and dtype, loaded once per model.

        Raises :class:`OverVramBudget` (before loading anything) when the model's estimated
        weights exceed the budget; evicts the least recently used pipelines to make room.
        """
        import torch

        with self._lock:
            model = self.resolve(name)
            cached = self._loaded.get(model.key)
            if cached is not None:
                self._loaded.move_to_end(model.key)
                return cached
            device = resolve_device(self.device_policy, torch.cuda.is_available())
            dtype = resolve_dtype(self.dtype_policy, device)
            shape = read_model_shape(model.path, model.spec.pipeline_class)
            quantized = NF4_COMPONENTS if model.spec.quantization == "nf4" else ()
            weights = estimate_footprint(shape, dtype, quantized=quantized).weights_bytes
            budget = self.vram_budget_bytes
            if budget is not None and weights > budget:
                raise OverVramBudget(
                    f"model {model.name!r}: its weights need about {mib(weights)} ({weights} "
                    f"bytes of weights at {dtype}), over the VRAM budget of {mib(budget)} "
                    f"({budget} bytes); not loaded"
                )
            while self._loaded and (len(self._loaded) >= self.max_loaded or (
                    budget is not None and self.resident_bytes() + weights > budget)):
                self._evict(next(iter(self._loaded)))
            loaded = self._load(model, device, dtype, shape, weights)
            self._loaded[model.key] = loaded
            self.loads.append(model.key[0])
            return loaded

    def loaded(self) -> list[str]:
        """The canonical folders of the loaded pipelines."""
        return sorted(key[0] for key in self._loaded)

    def resident_bytes(self) -> int:
        """Device memory held by the loaded pipelines' weights (measured or estimated)."""
        return sum(loaded.weights_bytes for loaded in self._loaded.values())

    def _evict(self, key: ModelKey) -> None:
        device = self._loaded.pop(key).device
        _release(device)

    def _load(self, model: ResolvedModel, device: str, dtype: str, shape: ModelShape,
              weights: int) -> LoadedPipeline:
        import torch
        from diffusers.utils import logging as diffusers_logging

        # A service logs structured lines; the per-component loading bar is noise there.
        diffusers_logging.disable_progress_bar()
        cls = _pipeline_type(model.spec.pipeline_class)
        before = torch.cuda.memory_allocated() if device == "cuda" else 0
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
        if device == "cuda":  # the estimate was a guess: hold the model to what it takes
            weights = torch.cuda.memory_allocated() - before
            budget = self.vram_budget_bytes
            if budget is not None and weights > budget:
                del pipe
                _release(device)
                raise OverVramBudget(
                    f"model {model.name!r}: loaded, it took {mib(weights)} of CUDA memory, "
                    f"over the VRAM budget of {mib(budget)}; unloaded"
                )
        return LoadedPipeline(model.name, pipe, model.spec.pipeline_class, model.path,
                              device, dtype, weights, shape)


def _release(device: str) -> None:
    """Free what dropped pipelines held: collect their cycles, then CUDA's cached blocks."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _shown(name: str) -> str:
    return repr(name[:80]) + ("..." if len(name) > 80 else "")


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
