"""Training end to end on a tiny model and a synthetic clip set: the loss drops, temporal-only training leaves
every frozen parameter bit-identical, a resumed run continues bit for bit, the latent cache gives the on-the-fly
features, the fine-tuned model loads with ``svd_jax.load``, and ``svd-jax train`` runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import svd_jax
from parity import max_rel_err
from svd_jax.checkpoint import path_key
from svd_jax.train.cache import CachedClips, build_cache
from svd_jax.train.checkpoints import IN_USE
from svd_jax.train.cli import main
from svd_jax.train.config import config_from_dict
from svd_jax.train.trainer import LossLog, Trainer
from train_helpers import write_base_model, write_frame_folders

STEPS = 120


def _config(root, base, data, **changes):
    values = {
        "model": str(base), "output_dir": str(root / "out"), "steps": STEPS, "batch_size": 2, "seed": 3,
        "compute_dtype": "float32", "remat": False, "checkpoint_every": 1000, "log_every": 20,
        "data": {"path": str(data), "num_frames": 3, "height": 32, "width": 32},
        # The random VAE's posterior std exceeds its latents' spread, so x0 is its mean here; noise levels are
        # concentrated (p_std 1.0) so that a tiny model learns within a test's budget.
        "objective": {"latent_sample": False, "p_std": 1.0},
        "optimizer": {"learning_rate": 1e-2, "warmup_steps": 10, "decay_steps": STEPS - 10},
    }
    for key, value in changes.items():
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config_from_dict(values)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return root, write_base_model(root / "base"), write_frame_folders(root / "data", videos=2, frames=3)


def test_loss_drops_5x(setup):
    """The loss on a fixed batch with fixed noise (16 draws), before and after training."""
    root, base, data = setup
    trainer = Trainer(_config(root, base, data), progress=False)
    features = trainer.features(trainer.clips.batch(0, 2))
    keys = [jax.random.key(100 + i) for i in range(16)]

    def evaluate():
        return float(np.mean([trainer.step_fn.evaluate(trainer.state.params, trainer.frozen, trainer.vae_state,
                                                       features, k) for k in keys]))

    before = evaluate()
    rows = trainer.run()
    after = evaluate()
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    print(f"fixed-noise loss {before:.4f} -> {after:.4f} ({before / after:.1f}x); training loss, first 10 steps "
          f"{np.mean([r['loss'] for r in rows[:10]]):.4f}, last 20 {np.mean([r['loss'] for r in rows[-20:]]):.4f}")
    assert before / after >= 5
    assert LossLog(trainer.output / "losses.csv").read() == rows


def test_resume_continues_bit_for_bit(setup):
    root, base, data = setup
    rows = Trainer(_config(root, base, data, output_dir=str(root / "whole"), steps=7), progress=False).run()
    out = root / "resumed"
    first = Trainer(_config(root, base, data, output_dir=str(out), steps=4, checkpoint_every=2), progress=False)
    assert first.run() == rows[:4]
    assert first.checkpoints.steps() == [2, 4]
    # the checkpoint written mid-run (training went on at once, donating the saved buffers) is intact too
    assert first.restore(2) == 2 and first.position == 4
    assert first.run() == rows[2:4]
    del first
    second = Trainer(_config(root, base, data, output_dir=str(out), steps=7), progress=False)
    assert second.restored_step == 4 and second.position == 8
    assert second.run() == rows[4:7]
    assert LossLog(out / "losses.csv").read() == rows[:7]


def test_temporal_only_training_freezes_the_rest_and_exports(setup):
    root, base, data = setup
    config = _config(root, base, data, output_dir=str(root / "temporal"), steps=2, compute_dtype="bfloat16",
                     **{"optimizer.trainable": "temporal"})
    trainer = Trainer(config, progress=False)
    assert trainer.unet.merge(trainer.state.params, trainer.frozen).dtype == jnp.bfloat16
    before = {k: np.asarray(v) for k, v in {**trainer.state.params, **trainer.frozen}.items()}
    trainable = set(trainer.state.params)
    assert trainable and all(any(t in k for t in ("temporal_res_block", "temporal_transformer_blocks",
                                                  "time_pos_embed", "time_mixer")) for k in trainable)
    assert not any("temporal" in k or "time_mixer" in k or "time_pos_embed" in k for k in trainer.frozen)
    moments = trainer.state.opt_state[1][0]  # adamw's ScaleByAdamState
    assert set(moments.mu) == trainable and set(moments.nu) == trainable
    rows = trainer.run()
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    # bfloat16 compute, float32 master weights and Adam moments
    moments = trainer.state.opt_state[1][0]
    assert {v.dtype for v in [*trainer.state.params.values(), *moments.mu.values(), *moments.nu.values()]} == {
        jnp.dtype("float32")}
    after = {**trainer.state.params, **trainer.frozen}
    for key in trainer.frozen:
        assert np.array_equal(np.asarray(after[key]), before[key]), key
    # Every trainable leaf moved, but the zero-initialised biases of the norm before the temporal cross-attention:
    # with a single context token that attention's softmax is identically 1, so they get exactly zero gradient.
    unchanged = {k for k in trainable if np.array_equal(np.asarray(after[k]), before[k])}
    assert unchanged == {k for k in trainable if k.endswith("temporal_transformer_blocks.0.norm2.bias")}

    path = trainer.export()
    models = svd_jax.load(path, policy=svd_jax.Policy.float32())
    _, params = nnx.split(models.unet, nnx.Param)
    loaded = {path_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
    assert set(loaded) == set(after)
    assert all(np.array_equal(loaded[k], np.asarray(after[k])) for k in loaded)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["source"]["fine_tuned"] == {"base_model": str(base), "steps": 2, "trainable": "temporal"}
    assert models.vae.config == trainer.base.vae.config


def test_latent_cache_gives_the_on_the_fly_features(setup):
    root, base, data = setup
    trainer = Trainer(_config(root, base, data, output_dir=str(root / "cached")), progress=False)
    build_cache(trainer.clips, trainer.base.vae, trainer.base.image_encoder, root / "cache", "test", progress=False)
    cached = CachedClips(trainer.clips, root / "cache", "test")
    for position in (0, 3):
        expected = trainer.features(trainer.clips.batch(position, 2))
        actual = cached.batch(position, 2)
        for name, a, e in zip(expected._fields, actual, expected):  # equal up to batch-size-dependent rounding
            assert max_rel_err(a, e) <= 1e-5, name
    with pytest.raises(ValueError, match="not an up-to-date latent cache"):
        CachedClips(trainer.clips, root / "cache", "another model")

    # training from the cache (built by the trainer) sees the same clips
    from_cache = Trainer(_config(root, base, data, output_dir=str(root / "from_cache"), steps=2,
                                 **{"data.cache_dir": str(root / "cache2")}), progress=False)
    assert (root / "cache2" / "index.json").is_file()
    for a, e in zip(from_cache.run(), trainer.run(2)):
        assert abs(a["loss"] - e["loss"]) <= 1e-4 * e["loss"]


def test_cli_trains_resumes_and_writes_samples(setup, capsys):
    root, base, data = setup
    values = json.loads(json.dumps(_config(root, base, data).to_dict()))
    values.update(output_dir=str(root / "cli"), steps=2, log_every=1, checkpoint_every=1, keep_checkpoints=2)
    values["sample"] = {"every": 2, "num_inference_steps": 2}
    (root / "train.json").write_text(json.dumps(values))
    assert main([str(root / "train.json"), "--no-progress", "--single-device"]) == 0
    assert [r["step"] for r in LossLog(root / "cli" / "losses.csv").read()] == [1, 2]
    assert (root / "cli" / "samples" / "step-0000002.mp4").stat().st_size > 0
    assert (root / "cli" / "model" / "manifest.json").is_file()
    assert main([str(root / "train.json"), "--no-progress", "--single-device", "--steps", "3",
                 "--set", "sample.every=0"]) == 0
    assert "resuming at step 2" in capsys.readouterr().out
    assert [r["step"] for r in LossLog(root / "cli" / "losses.csv").read()] == [1, 2, 3]
    steps = sorted(p.name for p in (root / "cli" / "checkpoints").iterdir() if p.name != IN_USE)
    assert steps == ["2", "3"]  # the last two kept
    assert main([str(root / "train.json"), "--set", "optimizer.trainable=\"nothing\""]) == 2
    assert "optimizer.trainable must be one of" in capsys.readouterr().err


def test_loss_log_ignores_a_row_cut_short(tmp_path):
    """A run killed while appending leaves a last line without its newline: it is not read as a row (it would be
    a row of missing or truncated numbers), and the resume's truncate rewrites the file without it."""
    log = LossLog(tmp_path / "losses.csv")
    log.truncate(0)
    rows = [{"step": s, "loss": 0.5, "grad_norm": 1.0, "learning_rate": 1e-3} for s in (1, 2)]
    log.append(rows)
    with log.path.open("a") as f:
        f.write("3,0.25,1.")
    assert log.read() == rows
    log.truncate(2)
    assert log.read() == rows and log.path.read_text().endswith("0.001\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["losses.csv"]


def test_a_cut_short_cache_index_is_not_a_cache(tmp_path):
    """The index that marks a latent cache complete, cut short by a killed run, means "no cache" (it is built
    again), not a JSON traceback."""
    from svd_jax.train.config import DataConfig
    from svd_jax.train.data import VideoClips

    data = write_frame_folders(tmp_path / "data", videos=1, frames=3)
    clips = VideoClips(DataConfig(path=str(data), num_frames=3, height=32, width=32), seed=0)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "index.json").write_text('{"format": ')
    with pytest.raises(ValueError, match="not an up-to-date latent cache"):
        CachedClips(clips, tmp_path / "cache", "model")
