"""A tiny FLUX pipeline with random weights, built entirely locally (no hub, no files read).

The result has the real FLUX architecture at toy sizes (8x VAE downscale, 16 latent channels,
CLIP + T5 text encoders), so tests run the same code path as a real model in milliseconds.
Tokenizers are built by hand from a fixed word list: no training, so the build is reproducible.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "photo", "painting", "drawing",
    "cat", "dog", "bird", "fish", "tree", "house", "car", "boat", "mountain", "river", "sky",
    "red", "green", "blue", "yellow", "black", "white", "small", "big", "old", "new",
    "sunset", "night", "day", "city", "forest", "sea", "portrait", "landscape", "blurry",
    "ugly", "bad", "quality", "high", "low", "detailed", "simple", "stamp", "flow",
)

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
TEXT_VOCAB_SIZE = 1000


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte mapped to a printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def clip_vocab(
    words: tuple[str, ...] = WORDS,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP BPE vocabulary and merges: alphabet, alphabet+``</w>``, one chain per word."""
    alphabet = sorted(_bytes_to_unicode().values())
    tokens: list[str] = [*alphabet, *(c + "</w>" for c in alphabet)]
    merges: list[tuple[str, str]] = []
    seen_tokens = set(tokens)
    seen_merges: set[tuple[str, str]] = set()
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            merge = (left, right)
            left = left + right
            if merge not in seen_merges:
                seen_merges.add(merge)
                merges.append(merge)
            if left not in seen_tokens:
                seen_tokens.add(left)
                tokens.append(left)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def t5_vocab(words: tuple[str, ...] = WORDS) -> list[tuple[str, float]]:
    """The T5 Unigram vocabulary: specials, ``▁``, ASCII characters, ``▁word`` pieces."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0),
                                       ("▁", -2.0)]
    pieces += [(chr(c), -5.0) for c in range(ord("!"), ord("~") + 1)]
    pieces += [("▁" + word, -1.0) for word in words]
    return pieces


def make_tiny_flux(directory: Path, seed: int = 0) -> Path:
    """Build a tiny random-weight FluxPipeline and ``save_pretrained`` it into ``directory``.

    Same ``seed`` → same weights. Returns ``directory``.
    """
    import torch

    # Untyped third-party constructors: reached through Any to keep this module strict-clean.
    diffusers: Any = importlib.import_module("diffusers")
    transformers: Any = importlib.import_module("transformers")

    vocab, merges = clip_vocab()
    if len(vocab) > TEXT_VOCAB_SIZE:
        raise ValueError(f"tiny CLIP vocabulary of {len(vocab)} exceeds {TEXT_VOCAB_SIZE}")
    tokenizer = transformers.CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH
    )
    tokenizer_2 = transformers.T5TokenizerFast(
        vocab=t5_vocab(), extra_ids=0, model_max_length=T5_MAX_LENGTH
    )

    torch.manual_seed(seed)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=False,
    )
    torch.manual_seed(seed + 1)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=TEXT_VOCAB_SIZE, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=32, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    ))
    torch.manual_seed(seed + 2)
    text_encoder_2 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=TEXT_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1,
    ))
    torch.manual_seed(seed + 3)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, latent_channels=16, norm_num_groups=4, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory)
    return directory
