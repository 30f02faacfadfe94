"""Whether a generation's size fits the machine, estimated from the configs before anything is loaded.

What grows fastest with the frame size is attention over the latent pixels: on the XLA path (CPU, TPU, a GPU in
float32) every self-attention holds float32 scores for a block of queries against all keys, and the softmax's
weights as large again (:mod:`svd_jax.attention` decides the kernel and the block). cuDNN's flash attention holds
none. The estimate is those two buffers for the largest attention of the UNet's denoising step and of the VAE
decoder: a floor on what the generation needs besides the weights, not a prediction of its peak. The XLA path
bounds its block by the whole batch x heads x tokens x tokens footprint, so this is at most about 2 GiB: the tiny
model at the released models' 576x1024 (its VAE downsamples by 2, so its UNet attends over 147,456 latent tokens)
holds about 2.1 GiB of scores, where its own 64x96 holds 0.6 GiB.
"""

from __future__ import annotations


import jax

from svd_jax import attention

GIB = 2**30


def available_bytes(device: jax.Device | None = None) -> int | None:
    """Free memory on ``device`` (default: the first): the allocator's limit minus what is in use on a GPU/TPU,
    what the operating system reports available on a CPU (Linux ``MemAvailable``); None when it cannot be told."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def attention_score_bytes(batch: int, heads: int, tokens: int, head_dim: int, dtype, impl: str) -> int:
    """float32 scores and softmax weights one self-attention over ``tokens`` holds at once (0 with flash)."""
    if attention.choose_impl(impl, dtype, tokens, head_dim) != "xla":
        return 0
    rows, queries = attention.xla_blocks(batch, heads, tokens, tokens, attention.XLA_BLOCK_ELEMENTS)
    return 2 * 4 * rows * heads * queries * tokens


def attention_estimate(unet_config, vae_config, policy, height: int, width: int, num_frames: int,
                       batch: int = 1, guided: bool = True, decode_chunk_size: int | None = None) -> dict[str, int]:
    """``{"the denoising step": bytes, "the decoder": bytes}``: the attention buffers of each, as the module
    docstring describes, for videos of ``num_frames`` frames at ``height x width``."""
    h, w = height // vae_config.downsample_factor, width // vae_config.downsample_factor
    rows = batch * (2 if guided else 1) * num_frames
    step = 0
    for level, (block, channels, heads) in enumerate(zip(unet_config.down_block_types, unet_config.block_out_channels,
                                                         unet_config.num_attention_heads)):
        if block.startswith("CrossAttn"):
            tokens = (h >> level) * (w >> level)
            step = max(step, attention_score_bytes(rows, heads, tokens, channels // heads, policy.compute,
                                                   policy.attention_impl))
    channels = vae_config.block_out_channels[-1]
    chunk = min(decode_chunk_size or num_frames, num_frames)
    decode = attention_score_bytes(chunk, 1, h * w, channels, policy.compute, policy.attention_impl)
    return {"the denoising step": step, "the decoder": decode}


def size_warning(estimate: dict[str, int], free: int | None, height: int, width: int, advice: str) -> str | None:
    """A one-line warning when the largest estimate exceeds ``free`` bytes, else None."""
    if free is None or not estimate:
        return None
    name, need = max(estimate.items(), key=lambda item: item[1])
    if need <= free:
        return None
    return (f"at {width}x{height}, {name}'s attention alone holds about {need / GIB:.1f} GiB at once, more than the "
            f"{free / GIB:.1f} GiB this machine has free: it will likely run out of memory; {advice}")
