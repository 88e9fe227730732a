"""What a real FLUX.1-schnell image costs on this GPU, without downloading any weights.

    python -m bench.gpu_flux [--quick] [--compile both|off|on] [--fp8] [--out bench/results]
    python -m bench.gpu_flux --tiny-cpu-check     # builds a 1-layer version on CPU, one step

Builds the full-size FLUX.1-schnell components from their published configs with random
weights, directly on CUDA in bf16 (random weights cost the same FLOPs as the real ones):

- ``FluxTransformer2DModel``: 19 double blocks, 38 single blocks, 24 heads of 128,
  joint_attention_dim 4096, pooled_projection_dim 768, in_channels 64, rope (16, 56, 56),
  no guidance embedding (schnell);
- the FLUX VAE (``AutoencoderKL``, 16 latent channels, blocks 128/256/512/512);
- the two text encoders, CLIP ViT-L/14 text (12 x 768) and T5 v1.1 XXL encoder (24 x 4096).

The tokenizers are not available without a download, so the denoise + decode is timed through
the real ``FluxPipeline.__call__`` given random ``prompt_embeds``/``pooled_prompt_embeds``
(text encoders left out of the pipeline), and the two text encoders are timed separately on
random token ids (CLIP 77 tokens, T5 ``--seq-len`` tokens). ``seconds_per_image`` is the
pipeline call (4 steps + VAE decode) divided by the batch; ``with_text_s_per_image`` adds the
measured text-encoder cost per image. ``torch.compile`` is applied to the transformer only.

Writes ``bench/results/gpu_flux.json`` and ``gpu_flux.md``. Published anchor: about 0.29 s
per 512x512 image for FLUX.1-schnell with fp8 + torch.compile on an H100.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Result = dict[str, Any]

# FLUX.1-schnell's configs (black-forest-labs/FLUX.1-schnell, */config.json).
TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                   pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
                   guidance_embeds=False)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
           layers_per_block=2, act_fn="silu", latent_channels=16, norm_num_groups=32,
           sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
           use_post_quant_conv=False)
CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
            hidden_act="quick_gelu")
T5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
          relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False,
                 base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)

# --tiny-cpu-check: the same code path, one block of each kind, small widths.
TINY_TRANSFORMER = dict(TRANSFORMER, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        axes_dims_rope=(4, 4, 8))
TINY_VAE = dict(VAE, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
TINY_CLIP = dict(CLIP, vocab_size=1000, hidden_size=32, intermediate_size=37,
                 num_hidden_layers=1, num_attention_heads=4, projection_dim=32,
                 bos_token_id=0, eos_token_id=1, pad_token_id=1)
TINY_T5 = dict(T5, vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
               relative_attention_num_buckets=8)


@contextlib.contextmanager
def default_dtype(dtype: Any) -> Iterator[None]:
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(tiny: bool, device: str, dtype: Any) -> tuple[Any, Any, Any]:
    """(FluxPipeline without text encoders, CLIP text model, T5 encoder), random weights.

    Modules are created under ``torch.device(device)`` and the default dtype, so the 12B
    parameters are allocated and initialised on the GPU in bf16 (no 48 GB fp32 CPU copy).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        transformer = FluxTransformer2DModel(**(TINY_TRANSFORMER if tiny else TRANSFORMER))
        vae = AutoencoderKL(**(TINY_VAE if tiny else VAE))
        clip = CLIPTextModel(CLIPTextConfig(**(TINY_CLIP if tiny else CLIP)))
        t5 = T5EncoderModel(T5Config(**(TINY_T5 if tiny else T5)))
    for module in (transformer, vae, clip, t5):
        module.to(device=device, dtype=dtype).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                        text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe, clip, t5


def make_call(pipe: Any, clip: Any, t5: Any, *, size: int, batch: int, steps: int,
              seq_len: int, device: str, dtype: Any) -> tuple[Callable[[], Any],
                                                             Callable[[], Any]]:
    """(the pipeline call on random embeddings, the two text encoders on random ids)."""
    import torch

    cfg = pipe.transformer.config
    g = torch.Generator(device).manual_seed(0)
    prompt_embeds = torch.randn(batch, seq_len, cfg.joint_attention_dim, generator=g,
                                device=device, dtype=dtype)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g, device=device,
                         dtype=dtype)
    clip_ids = torch.randint(0, clip.config.vocab_size, (batch, 77), device=device)
    t5_ids = torch.randint(0, t5.config.vocab_size, (batch, seq_len), device=device)

    def denoise_and_decode() -> Any:
        with torch.inference_mode():
            return pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, height=size,
                        width=size, num_inference_steps=steps, guidance_scale=0.0,
                        max_sequence_length=seq_len, output_type="pt",
                        generator=torch.Generator(device).manual_seed(1)).images

    def encode_text() -> Any:
        with torch.inference_mode():
            clip(clip_ids, output_hidden_states=False)
            return t5(t5_ids).last_hidden_state

    return denoise_and_decode, encode_text


def timed(fn: Callable[[], Any], repeat: int, sync: Callable[[], None]) -> list[float]:
    out = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def tiny_cpu_check() -> None:
    """Run the model-building and calling code on CPU with one-layer modules, one step."""
    import torch

    pipe, clip, t5 = build(tiny=True, device="cpu", dtype=torch.float32)
    call, text = make_call(pipe, clip, t5, size=64, batch=2, steps=1, seq_len=16,
                           device="cpu", dtype=torch.float32)
    t0 = time.perf_counter()
    images = call()
    emb = text()
    assert tuple(images.shape) == (2, 3, 64, 64), images.shape
    assert tuple(emb.shape) == (2, 16, 32), emb.shape
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"tiny CPU check ok: 1+1-block FluxTransformer2DModel ({params} params), VAE, CLIP, "
          f"T5 built; one step + decode gave images {tuple(images.shape)} in "
          f"{time.perf_counter() - t0:.2f}s")


def apply_fp8(transformer: Any) -> str:
    """Dynamic float8 activations and weights on the transformer's linears (torchao)."""
    try:
        from torchao.quantization import (  # type: ignore[import-not-found]
            float8_dynamic_activation_float8_weight,
            quantize_,
        )
    except ImportError:
        return "torchao not installed: fp8 skipped"
    quantize_(transformer, float8_dynamic_activation_float8_weight())
    return "torchao float8_dynamic_activation_float8_weight"


def run_gpu(args: argparse.Namespace) -> Result:
    import diffusers
    import torch
    import transformers

    dtype = torch.bfloat16
    dev = "cuda"
    sync = torch.cuda.synchronize
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    pipe, clip, t5 = build(tiny=False, device=dev, dtype=dtype)
    sync()
    build_s = time.perf_counter() - t0
    n_params = {name: sum(p.numel() for p in m.parameters()) for name, m in
                (("transformer", pipe.transformer), ("vae", pipe.vae), ("clip", clip),
                 ("t5", t5))}
    fp8_note = apply_fp8(pipe.transformer) if args.fp8 else None
    sizes = [512] if args.quick else [512, 1024]
    batches = [1, 4] if args.quick else [1, 4, 8]
    modes = {"both": ["off", "on"], "off": ["off"], "on": ["on"]}[args.compile]
    repeat = 2 if args.quick else 3
    rows: list[Result] = []
    text_cost: dict[int, float] = {}
    for batch in batches:  # the text encoders do not depend on the image size
        _, text = make_call(pipe, clip, t5, size=512, batch=batch, steps=args.steps,
                            seq_len=args.seq_len, device=dev, dtype=dtype)
        timed(text, 1, sync)
        text_cost[batch] = statistics.median(timed(text, repeat, sync)) / batch
    for mode in modes:  # "off" runs first: compiling in place cannot be undone
        if mode == "on":
            torch._dynamo.config.cache_size_limit = max(
                64, torch._dynamo.config.cache_size_limit)
            pipe.transformer.compile(mode=args.compile_mode)  # nn.Module.compile, in place
        for size in sizes:
            for batch in batches:
                row: Result = {"compile": mode, "size": size, "batch": batch,
                               "steps": args.steps}
                call, _ = make_call(pipe, clip, t5, size=size, batch=batch, steps=args.steps,
                                    seq_len=args.seq_len, device=dev, dtype=dtype)
                try:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    w0 = time.perf_counter()
                    timed(call, 2 if mode == "on" else 1, sync)  # warm-up (and compile)
                    row["warmup_s"] = time.perf_counter() - w0
                    times = timed(call, repeat, sync)
                except torch.cuda.OutOfMemoryError as err:
                    row["error"] = f"out of memory: {str(err).splitlines()[0]}"
                    rows.append(row)
                    print(f"  {mode} {size} x{batch}: OOM", file=sys.stderr)
                    continue
                call_s = statistics.median(times)
                row.update({
                    "call_s": call_s, "seconds_per_image": call_s / batch,
                    "images_per_s": batch / call_s,
                    "text_encoders_s_per_image": text_cost[batch],
                    "with_text_s_per_image": call_s / batch + text_cost[batch],
                    "peak_vram_gb": torch.cuda.max_memory_allocated() / 2**30,
                })
                rows.append(row)
                print(f"  compile {mode} {size}x{size} batch {batch}: "
                      f"{row['seconds_per_image']:.3f} s/image, {row['images_per_s']:.2f} "
                      f"images/s, peak {row['peak_vram_gb']:.1f} GB", file=sys.stderr)
    props = torch.cuda.get_device_properties(0)
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"gpu": props.name, "gpu_memory_gb": props.total_memory / 2**30,
                    "cuda": torch.version.cuda, "torch": torch.__version__,
                    "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                    "python": sys.version.split()[0], "platform": platform.platform()},
        "dtype": "bfloat16", "fp8": fp8_note, "compile_mode": args.compile_mode,
        "seq_len": args.seq_len, "build_s": build_s, "parameters": n_params,
        "quick": args.quick, "rows": rows,
        "anchor": "FLUX.1-schnell, fp8 + torch.compile, H100: ~0.29 s per 512x512 image",
    }


def markdown(r: Result) -> str:
    m = r["machine"]
    out = [f"# FLUX.1-schnell cost, random weights — {r['when']}", "",
           f"GPU: {m['gpu']} ({m['gpu_memory_gb']:.0f} GB), CUDA {m['cuda']}, torch "
           f"{m['torch']}, diffusers {m['diffusers']}. bf16"
           + (f", fp8: {r['fp8']}" if r["fp8"] else "") + f", T5 sequence {r['seq_len']}, "
           f"torch.compile mode {r['compile_mode']!r} on the transformer. Parameters: "
           + ", ".join(f"{k} {v / 1e9:.2f}B" for k, v in r["parameters"].items()) + ".", "",
           "s/image = one pipeline call (4 steps + VAE decode) / batch; text encoders (CLIP-L + "
           "T5-XXL) timed apart and added in the last column.", "",
           "| compile | size | batch | s/image | images/s | + text, s/image | peak VRAM |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        if "error" in row:
            out.append(f"| {row['compile']} | {row['size']} | {row['batch']} | {row['error']} "
                       "| | | |")
            continue
        out.append(f"| {row['compile']} | {row['size']} | {row['batch']} | "
                   f"{row['seconds_per_image']:.3f} | {row['images_per_s']:.2f} | "
                   f"{row['with_text_s_per_image']:.3f} | {row['peak_vram_gb']:.1f} GB |")
    out += ["", f"Anchor: {r['anchor']}."]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 only, batch 1 and 4")
    parser.add_argument("--compile", choices=["both", "off", "on"], default="both")
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    parser.add_argument("--fp8", action="store_true", help="torchao float8 on the transformer")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512,
                        help="T5 tokens (stampflow's engine passes max_sequence_length=512)")
    parser.add_argument("--tiny-cpu-check", action="store_true",
                        help="build a 1-layer version on CPU and run one step (no GPU needed)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    if args.tiny_cpu_check:
        tiny_cpu_check()
        return
    import torch

    if not torch.cuda.is_available():
        print("bench.gpu_flux: CUDA is not available here (torch "
              f"{torch.__version__}); run it on a GPU machine, or use --tiny-cpu-check",
              file=sys.stderr)
        sys.exit(2)
    result = run_gpu(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_flux.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "gpu_flux.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
