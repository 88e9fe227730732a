"""Device memory: what a pipeline's weights and one image's activations take, estimated from
the model's files before anything is loaded.

:func:`read_model_shape` reads only small files (safetensors headers, component configs);
:func:`estimate_footprint` and :func:`batch_capacity` are pure arithmetic over those numbers,
so the budget logic is tested on any machine with the tiny model's numbers.

The activation estimate is a linear model per image, in elements of the compute dtype:

- the transformer keeps about ``TOKEN_ACTIVATIONS`` x its width per token alive at a time
  (attention through SDPA, so no tokens x tokens matrix); FLUX has one image token per 16x16
  output pixels plus ``max_sequence_length`` text tokens;
- the VAE decoder runs at full resolution with up to ``decoder_channels`` channels and keeps
  about ``DECODER_ACTIVATIONS`` such tensors alive (the usual peak of a FLUX call);
- the decoded image is copied out as float32 RGB.

For FLUX.1-schnell in bfloat16 that is about 31.4 GiB of weights and 3.3 GiB per 1024x1024
image, so the contract's 40000 MiB holds batches of two at 1024x1024 and eight at 512x512.
The constants are deliberately generous; on CUDA the weights are also measured after loading.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stampflow.inference.errors import ModelNotFound

DTYPE_BYTES: Mapping[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
NF4_BYTES_PER_PARAMETER = 0.5625  # 4 bits plus a scale per block of 64 (bitsandbytes NF4)
TOKEN_ACTIVATIONS = 12
DECODER_ACTIVATIONS = 6
OUTPUT_BYTES_PER_PIXEL = 12  # RGB float32
MAX_HEADER_BYTES = 100 * 2**20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the estimate needs from a model's folder, read without loading it."""

    parameters: Mapping[str, int]  # component -> number of stored tensor elements
    transformer_width: int = 0  # attention heads x head size (or the UNet's widest block)
    decoder_channels: int = 0  # the VAE decoder's widest channel count at full resolution
    pixels_per_token: int = 256  # output pixels per image token: (VAE factor x patch)^2


@dataclass(frozen=True, slots=True)
class Footprint:
    """Estimated device memory: resident weights, and activations per image."""

    weights_bytes: int
    bytes_per_pixel: float
    bytes_per_image: int  # the part that does not grow with the image (text tokens)

    def image_bytes(self, width: int, height: int) -> int:
        return math.ceil(self.bytes_per_image + self.bytes_per_pixel * width * height)


def estimate_footprint(
    shape: ModelShape, dtype: str, *, quantized: Collection[str] = (), text_tokens: int = 512
) -> Footprint:
    """The footprint of ``shape`` loaded in ``dtype``, ``quantized`` components in NF4."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: not one of {', '.join(DTYPE_BYTES)}")
    size = DTYPE_BYTES[dtype]
    weights = sum(math.ceil(count * (NF4_BYTES_PER_PARAMETER if name in quantized else size))
                  for name, count in shape.parameters.items())
    per_token = TOKEN_ACTIVATIONS * shape.transformer_width * size
    per_pixel = (DECODER_ACTIVATIONS * shape.decoder_channels * size
                 + per_token / max(1, shape.pixels_per_token) + OUTPUT_BYTES_PER_PIXEL)
    return Footprint(weights, per_pixel, per_token * text_tokens)


def batch_capacity(budget_bytes: int | None, resident_bytes: int, image_bytes: int) -> int | None:
    """How many images fit beside ``resident_bytes`` of weights; None without a budget.

    0 means that not even one image fits: the request can never run within the budget.
    """
    if budget_bytes is None:
        return None
    return max(0, (budget_bytes - resident_bytes) // max(1, image_bytes))


def mib(n: float) -> str:
    """Bytes as MiB for messages: '1 MiB', '0.4768 MiB', '31420 MiB'."""
    return f"{n / 2**20:.4g} MiB"


# --- reading a model's folder ------------------------------------------------------------------


def parameter_count(header: Mapping[str, Any]) -> int:
    """Tensor elements listed in a safetensors header."""
    total = 0
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, Mapping):
            continue
        total += math.prod(int(d) for d in entry.get("shape", ()))
    return total


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: 8 bytes of length, then the header."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            raw = f.read(length) if 0 < length <= MAX_HEADER_BYTES else b""
        header = json.loads(raw) if raw and len(raw) == length else None
    except (OSError, ValueError) as err:
        raise ModelNotFound(f"{path}: cannot read its header: {err}") from None
    if not isinstance(header, dict):
        raise ModelNotFound(f"{path}: not a safetensors file (no readable header)")
    return header


def _weight_files(component: Path) -> list[Path]:
    """The files ``from_pretrained`` reads without a variant: every shard, no ``.fp16.`` copy."""
    for suffix in WEIGHT_SUFFIXES:
        files = sorted(component.glob(f"*{suffix}"))
        plain = [f for f in files if "." not in f.name.removesuffix(suffix)]
        if plain or files:
            return plain or files
    return []


def _component_parameters(component: Path) -> int:
    total = 0
    for path in _weight_files(component):
        if path.suffix == ".safetensors":
            total += parameter_count(read_safetensors_header(path))
        else:  # a pickled checkpoint: its size, taken as float32
            total += path.stat().st_size // 4
    return total


def _config(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def read_model_shape(folder: Path, pipeline_class: str) -> ModelShape:
    """Parameter counts per component (safetensors headers) and the sizes the activation
    estimate needs (component configs). Reads a few small files; loads no weights."""
    index = _config(folder / "model_index.json")
    parameters: dict[str, int] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or not (folder / name).is_dir():
            continue
        count = _component_parameters(folder / name)
        if count:
            parameters[name] = count
    transformer = _config(folder / "transformer" / "config.json")
    unet = _config(folder / "unet" / "config.json")
    vae_channels = [int(c) for c in _config(folder / "vae" / "config.json").get(
        "block_out_channels", ())]
    width = int(transformer.get("num_attention_heads", 0)) * int(
        transformer.get("attention_head_dim", 0))
    if not width and unet.get("block_out_channels"):
        width = max(int(c) for c in unet["block_out_channels"])
    factor = 2 ** max(0, len(vae_channels) - 1)
    patch = 2 if pipeline_class.startswith("Flux") else 1
    return ModelShape(
        parameters=parameters, transformer_width=width,
        decoder_channels=max(vae_channels[:2], default=0),
        pixels_per_token=(factor * patch) ** 2,
    )
