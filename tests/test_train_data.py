"""Training data and config: video files and frame folders, per-clip fps and motion bucket, deterministic clip
positions (what a resumed run relies on), resizing, and clear errors for bad folders and configs."""

import gc
import json
import warnings
import weakref

import imageio.v2 as imageio
import numpy as np
import PIL.Image
import pytest

from svd_jax.train.config import DataConfig, config_from_dict, load_config
from svd_jax.train.data import VideoClips, fit_frame, prefetch, scan
from train_helpers import square_frame, write_frame_folders


def _write_video(path, frames: int, fps: float, codec: str, size=(32, 48)):
    with imageio.get_writer(path, fps=fps, codec=codec, macro_block_size=1, **(
            {"quality": 10} if codec == "libx264" else {"output_params": ["-crf", "4", "-b:v", "0"]})) as writer:
        for i in range(frames):
            frame = np.zeros((*size, 3), np.uint8)
            frame[...] = 10 * i  # the frame index, readable after lossy coding
            writer.append_data(frame)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    write_frame_folders(root, videos=2, frames=5)
    _write_video(root / "b.mp4", 12, 10.0, "libx264")
    _write_video(root / "c.webm", 9, 15.0, "libvpx-vp9")
    _write_video(root / "short.mp4", 2, 10.0, "libx264")
    (root / "notes.txt").write_text("not a video")
    (root / "metadata.json").write_text(json.dumps({"clip1": {"fps": 12, "motion_bucket_id": 40},
                                                    "c.webm": {"motion_bucket_id": 200}}))
    return root


def test_scan_reads_videos_frame_folders_and_metadata(folder):
    with pytest.warns(UserWarning, match="skipping 1 video.*short.mp4"):
        entries = scan(DataConfig(path=str(folder), num_frames=3, frame_stride=2))
    found = {e.name: (e.num_frames, e.fps, e.motion_bucket_id) for e in entries}
    assert found == {"b.mp4": (12, 10.0, 127.0), "c.webm": (9, 15.0, 200.0), "clip0": (5, 7.0, 127.0),
                     "clip1": (5, 12.0, 40.0)}
    with pytest.warns(UserWarning):
        forced = scan(DataConfig(path=str(folder), num_frames=3, fps=24))
    assert {e.name: e.fps for e in forced} == {"b.mp4": 24.0, "c.webm": 24.0, "clip0": 24.0, "clip1": 12.0}


def test_clips_are_a_pure_function_of_the_position(folder):
    config = DataConfig(path=str(folder), num_frames=3, height=16, width=16, frame_stride=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clips, again, other = VideoClips(config, 0), VideoClips(config, 0), VideoClips(config, 1)
    a, b = clips.batch(5, 3), again.batch(5, 3)
    assert a.frames.shape == (3, 3, 16, 16, 3) and a.frames.dtype == np.float32
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(clips.batch(i, 1).frames, other.batch(i, 1).frames) for i in range(4))
    # each epoch visits every video once
    assert sorted(clips.sampler(i).video for i in range(4)) == [0, 1, 2, 3]
    assert sorted(clips.sampler(i).video for i in range(4, 8)) == [0, 1, 2, 3]
    # the epoch's order is the sampler's own: nothing keeps a dropped sampler alive
    dropped = weakref.ref(again.sampler)
    del again
    gc.collect()
    assert dropped() is None
    # prefetching in a background thread changes nothing
    stream = prefetch(clips, 5, 3)
    position, batch = next(stream)
    stream.close()
    assert position == 5 and all(np.array_equal(x, y) for x, y in zip(batch, a))
    # a process of several reads only its rows of each global batch: those one process reads there
    stream = prefetch(clips, 5, 3, rows=range(1, 3))
    (position, batch), (following, _) = next(stream), next(stream)
    stream.close()
    assert (position, following) == (5, 8) and all(np.array_equal(x, y[1:3]) for x, y in zip(batch, a))


def test_video_frames_come_in_order_with_the_stride(folder):
    config = DataConfig(path=str(folder), num_frames=3, height=16, width=16, frame_stride=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clips = VideoClips(config, 0)
    names = [e.name for e in clips.entries]
    for position in range(8):
        ref = clips.sampler(position)
        frames = clips.read(ref, clips.frame_indices(ref))
        entry = clips.entries[ref.video]
        if entry.name.endswith((".mp4", ".webm")):
            levels = frames.reshape(3, -1).mean(axis=1) / 10
            np.testing.assert_allclose(levels, [ref.start, ref.start + 2, ref.start + 4], atol=0.3)
        else:
            video = names.index(entry.name) - 2  # clip0, clip1 follow b.mp4 and c.webm
            expected = fit_frame(PIL.Image.fromarray(square_frame(video, ref.start + 2)), 16, 16)
            assert np.array_equal(frames[1], expected)
    batch = clips.batch(0, 4)
    by_name = {clips.entries[clips.sampler(i).video].name: i for i in range(4)}
    assert batch.fps_id[by_name["clip1"]] == 5.0  # 12 fps / stride 2 = 6 fps; the UNet sees fps - 1
    assert batch.fps_id[by_name["b.mp4"]] == 4.0 and batch.motion_bucket_id[by_name["c.webm"]] == 200.0


def test_fit_frame_covers_and_centre_crops():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 10:30] = 255  # the centre half
    out = fit_frame(PIL.Image.fromarray(image), 16, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[:, 2:14].min() > 200  # the crop keeps the centre


@pytest.mark.parametrize("setup,message", [
    (lambda root: None, "is not a folder"),
    (lambda root: root.mkdir(), "holds no video or frame folder"),
    (lambda root: (root.mkdir(), (root / "metadata.json").write_text("{")), "not valid JSON"),
    (lambda root: (root.mkdir(), (root / "metadata.json").write_text("[1]")), "must map each video"),
    (lambda root: (root.mkdir(), (root / "x.mp4").write_text("no video")), "cannot read the video"),
])
def test_bad_folders(tmp_path, setup, message):
    setup(tmp_path / "data")
    with pytest.raises(ValueError, match=message):
        scan(DataConfig(path=str(tmp_path / "data"), num_frames=3))


def test_config_files_and_errors(tmp_path):
    values = {"model": "tiny", "output_dir": "out", "data": {"path": "clips", "num_frames": 5},
              "optimizer": {"trainable": "temporal"}}
    (tmp_path / "a.json").write_text(json.dumps(values))
    (tmp_path / "b.toml").write_text('model = "tiny"\noutput_dir = "out"\n[data]\npath = "clips"\nnum_frames = 5\n'
                                     '[optimizer]\ntrainable = ["time_mixer", "conv_out"]\n')
    a = load_config(tmp_path / "a.json", {"optimizer.learning_rate": 3e-5, "objective.p_mean": -1.2})
    assert a.optimizer.learning_rate == 3e-5 and a.objective.p_mean == -1.2 and a.data.num_frames == 5
    assert (a.objective.p_std, a.objective.cond_dropout, a.data.motion_bucket_id) == (1.6, 0.1, 127)
    b = load_config(tmp_path / "b.toml")
    assert b.optimizer.trainable == ("time_mixer", "conv_out")
    with pytest.raises(ValueError, match="unknown data option.*frames"):
        config_from_dict({**values, "data": {"path": "x", "frames": 3}})
    with pytest.raises(ValueError, match=r"a \[data\] section"):
        config_from_dict({"model": "tiny", "output_dir": "out"})
    with pytest.raises(ValueError, match="cond_dropout must be in"):
        config_from_dict({**values, "objective": {"cond_dropout": 2}})
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        config_from_dict({**values, "batch_size": 0})
    with pytest.raises(ValueError, match="must be a .json or .toml"):
        (tmp_path / "c.yaml").write_text("")
        load_config(tmp_path / "c.yaml")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.json")


def test_reading_videos_does_not_fork_the_jax_process(folder, monkeypatch):
    """ffmpeg is started without a fork that runs Python in the child (JAX warns of a deadlock on such forks)."""
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()  # JAX's threads are running, as in training
    monkeypatch.delenv("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", raising=False)
    config = DataConfig(path=str(folder), num_frames=3, height=16, width=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clips = VideoClips(config, 0)
        ref = next(clips.sampler(p) for p in range(20) if clips.entries[clips.sampler(p).video].name == "b.mp4")
        clips.read(ref, clips.frame_indices(ref))
    assert not [w for w in caught if "fork" in str(w.message)]
