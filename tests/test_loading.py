"""svd_jax.load: converted folders, unconverted sources converted once into the cache, Hub ids, tiny models."""

import os

import numpy as np
import pytest

import svd_jax
from svd_jax import loader


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SVD_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_unconverted_folder_is_converted_once_and_reused(tmp_path, isolated_cache):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from parity import randomize

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=1,
                              num_attention_heads=4, image_size=30, patch_size=10)
    randomize(CLIPVisionModelWithProjection(config)).save_pretrained(tmp_path / "repo" / "image_encoder")
    first = svd_jax.load(tmp_path / "repo", policy=svd_jax.Policy.float32())
    (converted,) = _converted(isolated_cache)
    stamp = (converted / "manifest.json").stat().st_mtime_ns
    second = svd_jax.load(tmp_path / "repo", policy=svd_jax.Policy.float32())
    assert (converted / "manifest.json").stat().st_mtime_ns == stamp  # reused, not converted again
    assert second.path == first.path == converted
    pixels = np.random.default_rng(0).normal(size=(1, 30, 30, 3)).astype(np.float32)
    np.testing.assert_array_equal(first.image_encoder(pixels), second.image_encoder(pixels))
    # a touched source is the same source; a changed one is converted again into a new folder
    os.utime(tmp_path / "repo" / "image_encoder" / "model.safetensors", ns=(1, 1))
    assert svd_jax.load(tmp_path / "repo", policy=svd_jax.Policy.float32()).path == converted
    config = tmp_path / "repo" / "image_encoder" / "config.json"
    config.write_text(config.read_text().replace('"layer_norm_eps": 1e-05', '"layer_norm_eps": 1e-06'))
    svd_jax.load(tmp_path / "repo", policy=svd_jax.Policy.float32())
    assert len(_converted(isolated_cache)) == 2


def _converted(cache):
    """The converted folders in the cache (not its hidden locks and hash memos)."""
    return [p for p in (cache / "converted").iterdir() if not p.name.startswith(".")]


def test_hub_id_offline_gives_a_clear_error(isolated_cache, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(isolated_cache / "hf"))
    with pytest.raises(RuntimeError) as error:
        svd_jax.load("stabilityai/stable-video-diffusion-img2vid-xt")
    message = str(error.value)
    assert "stabilityai/stable-video-diffusion-img2vid-xt" in message and "Offline?" in message
    assert "\n" not in message


def test_missing_path_and_not_converted(tmp_path, isolated_cache):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        svd_jax.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        svd_jax.load(tmp_path / "empty")
    with pytest.raises(ValueError, match="hub_variant"):
        loader.resolve("org/name", hub_variant="int8")


def test_tiny_models_run_every_component():
    models = svd_jax.load("tiny", policy=svd_jax.Policy.float32())
    assert models.unet.config.cross_attention_dim[0] == models.image_encoder.config.projection_dim
    embeds = models.image_encoder(np.zeros((1, 224, 224, 3), np.float32))
    assert embeds.shape == (1, 32) and np.isfinite(np.asarray(embeds)).all()


def test_random_and_loaded_models_compile_to_the_same_programs(tmp_path):
    """The persistent compilation cache is keyed on the program: weights placed differently (a committed
    argument) would give another program and a recompilation in every process that loads instead of drawing."""
    from flax import nnx

    from svd_jax import denoiser
    from svd_jax.train.checkpoints import save_models

    policy = svd_jax.Policy.float32()
    drawn = svd_jax.load("tiny", policy=policy)
    folder = save_models(tmp_path / "saved", {"unet": drawn.unet})
    loaded = svd_jax.load(folder, policy=policy, components=["unet"])
    latents = np.zeros((1, 2, 4, 4, 4), np.float32)
    cond = denoiser.Conditioning(np.zeros((1, 1, 32), np.float32), np.zeros((1, 4, 4, 4), np.float32),
                                 np.zeros((1, 3), np.float32), None)

    def program(models):
        graph, state = nnx.split(models.unet)
        return denoiser._euler_step.lower(graph, None, state, latents, 1.0, 0.5, 0.1, cond).as_text()

    assert program(drawn) == program(loaded)


def test_random_models_take_a_custom_draw():
    calls = []

    def ones(rng, shape):
        calls.append(shape)
        return np.ones(shape, np.float32)

    configs = {"vae": svd_jax.VAEConfig.tiny()}
    models = loader.random_models(configs, svd_jax.Policy.float32(), draw=ones)
    kernel = np.asarray(models.vae.decoder.conv_in.kernel[...])
    assert calls and np.allclose(kernel, kernel.flat[0]) and kernel.flat[0] == pytest.approx(
        np.prod(kernel.shape[:-1]) ** -0.5)


def test_components_are_restored_concurrently_and_exactly(tmp_path, monkeypatch):
    """Each component is restored in a thread of its own (the barrier lets a restore on only once all three are
    under way), and what is restored is exactly what was saved."""
    import threading

    from flax import nnx

    from svd_jax.train.checkpoints import save_models

    policy = svd_jax.Policy.float32()
    drawn = svd_jax.load("tiny", policy=policy)
    folder = save_models(tmp_path / "saved", {c: getattr(drawn, c) for c in ("image_encoder", "unet", "vae")})
    all_under_way = threading.Barrier(3, timeout=60)
    restore = loader.restore_model

    def restore_after_the_others_started(*args, **kwargs):
        all_under_way.wait()
        return restore(*args, **kwargs)

    monkeypatch.setattr(loader, "restore_model", restore_after_the_others_started)
    loaded = svd_jax.load(folder, policy=policy)
    for component in ("image_encoder", "unet", "vae"):
        saved, restored = (nnx.to_flat_state(nnx.state(getattr(m, component), nnx.Param)) for m in (drawn, loaded))
        assert [path for path, _ in saved] == [path for path, _ in restored]
        for (path, a), (_, b) in zip(saved, restored):
            assert a.get_value().dtype == b.get_value().dtype
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


RESTORE_ON_A_MESH = r"""
import sys
import jax, numpy as np
from flax import nnx
import svd_jax
from svd_jax import sharding
from svd_jax.checkpoint import path_key
from svd_jax.train.checkpoints import save_models

assert len(jax.devices()) == 4, jax.devices()
drawn = svd_jax.load("tiny", policy=svd_jax.Policy.float32())
folder = save_models(sys.argv[1], {"unet": drawn.unet, "vae": drawn.vae})
mesh = sharding.make_mesh()
sharder = sharding.param_sharder(mesh, shard_params=True, min_size=64)
loaded = svd_jax.load(folder, policy=svd_jax.Policy.bfloat16(), sharding=sharder)
split = 0
for component in ("unet", "vae"):
    saved = dict(nnx.to_flat_state(nnx.state(getattr(drawn, component), nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(getattr(loaded, component), nnx.Param)):
        array, expected = var.get_value(), np.asarray(saved[path].get_value())
        assert array.dtype == jax.numpy.bfloat16, (path, array.dtype)
        assert array.sharding == sharder(path_key(path), array.shape), (path, array.sharding)
        split += not array.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(array), expected.astype(jax.numpy.bfloat16), err_msg=str(path))
assert split > 10, split
print("ok", split)
"""


def test_restore_places_each_array_in_its_dtype_and_sharding_on_a_mesh(tmp_path):
    """load(..., sharding=...) restores every array straight into the policy's dtype and its own sharding across
    4 simulated devices (split along an axis where the sharder says so), with the saved values."""
    import subprocess
    import sys

    from parity import REPO

    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", RESTORE_ON_A_MESH, str(tmp_path / "saved")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]
