"""Inference errors. ``str()`` is one line naming the input and the reason; ``code`` is the
``EffectFailed.error_code`` the effect node reports."""

from __future__ import annotations


class InferenceError(Exception):
    code = "inference_error"
    transient = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ModelNotFound(InferenceError):
    code = "model_not_found"


class UnknownModel(ModelNotFound):
    """A request named a model that is not registered (a folder or repo id is never taken)."""

    code = "unknown_model"


class OverVramBudget(InferenceError):
    """The model's weights, or one image's activations beside them, exceed the VRAM budget."""

    code = "over_vram_budget"


class InvalidRequest(InferenceError):
    code = "invalid_request"


class UnsupportedConfiguration(InferenceError):
    """A device, dtype, quantisation or pipeline class that cannot be used here."""

    code = "unsupported_configuration"


class TransientInferenceError(InferenceError):
    """A failure worth retrying (a CUDA hiccup, a file system error while loading)."""

    code = "inference_error"
    transient = True
