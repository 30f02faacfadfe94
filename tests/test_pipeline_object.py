"""svd_jax.Pipeline's ownership contracts: what a callback is given it may keep, nothing outlives the pipeline
that prepared it, and weights updated in place are used by the next call. (Multi-device: tests/test_sharding.py.)"""

import gc
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import svd_jax
from parity import REPO

ARGS = dict(num_frames=2, num_inference_steps=2, height=32, width=32, seed=0, progress=False, output_type="latent")
IMAGE = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)


def test_callback_keeps_every_steps_latents():
    models = svd_jax.load("tiny", policy=svd_jax.Policy.float32())
    kept = []
    final = svd_jax.generate(IMAGE, models, callback_on_step_end=lambda step, sigma, x: kept.append(x), **ARGS)
    assert len(kept) == 2
    values = [np.asarray(x) for x in kept]  # a donated array would raise "Array has been deleted" here
    np.testing.assert_array_equal(values[-1], np.asarray(final))
    assert np.abs(values[0] - values[1]).max() > 0
    # a callback that returns the array it keeps: the next step must not consume it either
    returned = []
    svd_jax.generate(IMAGE, models, callback_on_step_end=lambda step, sigma, x: returned.append(x) or x, **ARGS)
    np.testing.assert_array_equal(np.asarray(returned[0]), values[0])


def test_fresh_wrappers_do_not_accumulate_arrays():
    """A half-precision VAE: a pipeline keeps a float32 copy of it, which must go with the pipeline (the float32
    UNet and encoder reuse the other tests' compilations)."""
    from svd_jax.components import recast

    models = svd_jax.load("tiny", policy=svd_jax.Policy.float32())
    half_vae = recast(models.vae, "vae", svd_jax.Policy.bfloat16())

    def wrapper():
        return svd_jax.SVDModels(models.path, svd_jax.Policy.bfloat16(), models.manifest, models.image_encoder,
                                 models.unet, half_vae)

    svd_jax.generate(IMAGE, wrapper(), **ARGS)  # compile first
    gc.collect()
    before = len(jax.live_arrays())
    for _ in range(5):
        svd_jax.generate(IMAGE, wrapper(), **ARGS)
    gc.collect()
    assert len(jax.live_arrays()) <= before


@jax.jit
def _scaled(tree, factor):
    """Every array times ``factor``, in one program (eager multiplies would compile once per shape)."""
    return jax.tree.map(lambda a: a * factor.astype(a.dtype), tree)


def _scale(module, factor):
    nnx.update(module, _scaled(nnx.state(module, nnx.Param), np.float32(factor)))


def test_in_place_update_is_used_by_the_next_call():
    models = svd_jax.load("tiny", policy=svd_jax.Policy.float32())
    pipe = svd_jax.Pipeline(models)
    before = np.asarray(pipe(IMAGE, **ARGS))
    before_generate = np.asarray(svd_jax.generate(IMAGE, models, **ARGS))
    np.testing.assert_array_equal(before, before_generate)
    _scale(models.unet, 0.5)
    after = np.asarray(pipe(IMAGE, **ARGS))
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(svd_jax.generate(IMAGE, models, **ARGS)), after)
    fresh = svd_jax.SVDModels(models.path, models.policy, models.manifest, models.image_encoder, models.unet,
                              models.vae)
    np.testing.assert_array_equal(np.asarray(svd_jax.Pipeline(fresh)(IMAGE, **ARGS)), after)


def test_half_precision_vae_copied_once_and_float32_vae_not_copied():
    half = svd_jax.load("tiny", policy=svd_jax.Policy.bfloat16())
    pipe = svd_jax.Pipeline(half)
    first = pipe._encoding_vae()
    assert first is not half.vae and first is pipe._encoding_vae()  # reused while the weights are the same
    _scale(half.unet, 1.0)  # the UNet changed, the VAE did not
    assert pipe._encoding_vae() is first
    _scale(half.vae, 2.0)
    assert pipe._encoding_vae() is not first
    full = svd_jax.load("tiny", policy=svd_jax.Policy.float32())
    assert svd_jax.Pipeline(full)._encoding_vae() is full.vae


def test_steps_compose_to_the_call():
    models = svd_jax.load("tiny", policy=svd_jax.Policy.float32())
    pipe = svd_jax.Pipeline(models)
    whole = pipe(IMAGE, **dict(ARGS, output_type="np"))
    cond = pipe.encode_conditioning(IMAGE, height=32, width=32, num_frames=2, seed=0)
    latents = pipe.sample(cond, num_inference_steps=2, seed=0, progress=False)
    np.testing.assert_array_equal(pipe.decode(latents), whole)
    # the denoiser samplers call: D(x, sigma) at one sigma, and one sigma per video, agree
    denoise = pipe.denoiser(cond)
    x = np.random.default_rng(1).standard_normal(latents.shape).astype(np.float32)
    np.testing.assert_allclose(np.asarray(denoise(x, 3.0)), np.asarray(denoise(x, np.array([3.0], np.float32))),
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="num_frames"):
        pipe.sample(cond, num_frames=3, progress=False)


def test_load_leaves_jax_config_unchanged():
    script = ("import jax, svd_jax; before = dict(jax.config.values); svd_jax.load('tiny'); "
              "print([k for k, v in jax.config.values.items() if before.get(k) != v])")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1].replace("'", '"')) == []




def test_a_new_size_compiles_one_program_per_stage():
    """A new size compiles each stage once as one program: the fused Euler step once (the first step's latents are
    placed like the steps' outputs), and no eager elementwise operations in between (each of those would be one
    more compilation per shape in every new process); a callback that returns host arrays adds nothing."""
    import logging

    from svd_jax import denoiser

    models = svd_jax.load("tiny", policy=svd_jax.Policy.float32())
    compiled = []

    class Programs(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Compiling "):
                compiled.append(message.split(" ")[1])

    handler, jax_logger = Programs(), logging.getLogger("jax")
    jax_logger.addHandler(handler)
    steps_before = denoiser._euler_step._cache_size()
    try:
        with jax.log_compiles(True):
            svd_jax.generate(IMAGE, models, **{**ARGS, "height": 40, "width": 40, "num_inference_steps": 3,
                                               "output_type": "uint8"},  # a size no other test uses
                             callback_on_step_end=lambda step, sigma, x: np.asarray(x))
    finally:
        jax_logger.removeHandler(handler)
    assert denoiser._euler_step._cache_size() == steps_before + 1
    stages = {"jit(clip_preprocess)", "jit(_encode_image)",  # once per process (CLIP's input size is fixed)
              "jit(copy)",  # the step donates its input: with a callback, the kept array is copied
              "jit(_noise_rows)", "jit(_encode_latents)", "jit(_conditioning_rows)", "jit(multiply)",
              "jit(_euler_step)", "jit(all_finite)", "jit(_unscaled_frames)", "jit(_decode)", "jit(_videos)",
              "jit(_output_frames)"}
    assert set(compiled) <= stages, sorted(set(compiled) - stages)
