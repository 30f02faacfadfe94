"""Interrupted and concurrent runs: Ctrl-C ends a conversion with exit 130 and nothing on disk, a killed one's
leftovers are removed by the next run, and two processes converting the same source for load() share one result.
Each child announces the point where it is interrupted (see faults.py)."""

import os
import shutil
import signal
import socket
import time

import pytest

from faults import finish, leftovers, start, wait_for_line
from parity import tiny_clip_folder

CONVERT = ("import sys\nimport svd_jax.checkpoint\n{pause}\nfrom convert.__main__ import main\n"
           "sys.exit(main(sys.argv[1:]))\n")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("src"))


def test_sigint_during_conversion(tmp_path, clip_folder):
    """Ctrl-C while orbax writes a component (the pause is in the tensor read that orbax's writer thread calls; it
    is released a moment after the interrupt, as a write in flight would end, and must not recreate anything after
    the cleanup)."""
    pause = "import convert.api\npause_at(convert.api, '_finite', 'PAUSED')"
    env = {"GATE": str(tmp_path / "gate")}
    child = start(CONVERT.format(pause=pause), clip_folder, tmp_path / "dst", "--no-hash", env=env)
    wait_for_line(child, "PAUSED")
    assert any(p.name.startswith(".dst.partial") for p in tmp_path.iterdir())
    child.send_signal(signal.SIGINT)
    time.sleep(1.0)
    (tmp_path / "gate").touch()
    code, err = finish(child)
    assert code == 130 and err.splitlines() == ["interrupted"], err
    time.sleep(0.5)
    assert leftovers(tmp_path, {"gate"}) == []


def test_sigint_inside_a_gc_callback_is_not_lost():
    """An interrupt that lands inside a garbage-collection callback (where Python would print "Exception ignored"
    and go on) is delivered just after it."""
    script = ("import gc, os, signal\nfrom svd_jax.interrupt import sigint_interrupts\n"
              "def callback(phase, info):\n"
              "    if phase == 'start' and not fired:\n"
              "        fired.append(1)\n        os.kill(os.getpid(), signal.SIGINT)\n        sum(range(1000))\n"
              "fired = []\ngc.callbacks.insert(0, callback)\n"
              "try:\n    with sigint_interrupts():\n        gc.collect()\n"
              "        for _ in range(500):\n            time.sleep(0.002)\n    print('FINISHED')\n"
              "except KeyboardInterrupt:\n    print('INTERRUPTED')\n")
    child = start(script)
    out, err = child.communicate(timeout=60)
    assert out.split() == ["INTERRUPTED"] and "Exception ignored" not in err, (out, err)


def test_sigterm_and_sighup_interrupt_unless_ignored():
    """A stop request (SIGTERM from kill or a scheduler, SIGHUP from a closed terminal) interrupts as Ctrl-C does,
    so the same cleanup runs; a signal the caller ignores (nohup) stays ignored; the handlers are restored."""
    script = ("import os, signal\nfrom svd_jax.interrupt import sigint_interrupts\n"
              "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
              "with sigint_interrupts():\n"
              "    os.kill(os.getpid(), signal.SIGHUP)\n    time.sleep(0.1)\n    print('IGNORED', flush=True)\n"
              "    try:\n        os.kill(os.getpid(), signal.SIGTERM)\n        time.sleep(5)\n"
              "    except KeyboardInterrupt:\n        print('INTERRUPTED')\n"
              "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)\n")
    child = start(script)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0 and out.split() == ["IGNORED", "INTERRUPTED", "True", "True"], (out, err)


def test_killed_conversion_is_cleaned_by_the_next(tmp_path, clip_folder):
    """kill -9 leaves a partial folder no process can remove; the next conversion next to it removes it."""
    child = start(CONVERT.format(pause="pause_at(svd_jax.checkpoint, 'save_params', 'PAUSED')"),
                  clip_folder, tmp_path / "dst", "--no-hash")
    wait_for_line(child, "PAUSED")
    child.kill()
    child.wait()
    assert [p.name for p in tmp_path.iterdir()] == [f".dst.partial-{socket.gethostname()}-{child.pid}"]
    from convert.__main__ import main

    assert main([str(clip_folder), str(tmp_path / "other"), "--no-hash"]) == 0
    assert leftovers(tmp_path) == ["other"]


EXPORT = ("import sys\nimport convert.export\npause_at(convert.export, 'write_safetensors', 'PAUSED')\n"
          "from convert.__main__ import main\nsys.exit(main(['--to-diffusers', *sys.argv[1:]]))\n")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_during_export(tmp_path, clip_folder, signum):
    """--to-diffusers: Ctrl-C (or SIGTERM, handled as Ctrl-C) while a weights file is written leaves nothing (a
    killed export's partial folder is removed by the next run exactly as a conversion's: both write through
    svd_jax.store.atomic_dir)."""
    from convert.__main__ import main

    assert main([str(clip_folder), str(tmp_path / "converted"), "--no-hash"]) == 0
    child = start(EXPORT, tmp_path / "converted", tmp_path / "out")
    wait_for_line(child, "PAUSED")
    child.send_signal(signum)
    code, err = finish(child)
    assert code == 130 and err.splitlines() == ["interrupted"], err
    assert leftovers(tmp_path, {"converted"}) == []


VIDEO = ("import sys\nimport numpy as np\nfrom svd_jax import video\npause_at(video.os, 'replace', 'PAUSED')\n"
         "video.save_video(np.zeros((2, 8, 8, 3), np.uint8), sys.argv[1])\n")


def test_killed_video_write_is_cleaned_by_the_next_write(tmp_path):
    """kill -9 just before the finished video is renamed into place leaves its scratch file (named after the dead
    process, with the extension ffmpeg needs); the next write into that folder removes it, but not the scratch of
    a live process."""
    import numpy as np

    from svd_jax import video

    child = start(VIDEO, tmp_path / "clip.mp4")
    wait_for_line(child, "PAUSED")
    child.kill()
    child.wait()
    host = socket.gethostname()
    assert leftovers(tmp_path) == [f".clip.mp4.partial-{host}-{child.pid}.mp4"]
    assert (tmp_path / leftovers(tmp_path)[0]).stat().st_size > 0
    live = tmp_path / f".other.gif.partial-{host}-{os.getpid()}.gif"  # a write in flight in this live process
    live.write_bytes(b"GIF89a")
    video.save_video(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "next.gif")
    assert leftovers(tmp_path) == sorted([live.name, "next.gif"])


SAVE = """import sys
import jax.numpy as jnp
from orbax.checkpoint._src.path import async_path
from svd_jax.train.checkpoints import Checkpoints
checkpoints = Checkpoints(sys.argv[1], keep=2)
checkpoints.save(1, {"w": jnp.ones((4, 4))}, {}, {"step": 1})
checkpoints.wait()
pause_at(async_path, "rename", "PAUSED")
checkpoints.save(2, {"w": jnp.zeros((4, 4))}, {}, {"step": 2})
checkpoints.wait()
"""


def test_killed_checkpoint_save_is_cleaned_by_the_next_run_and_by_clean(tmp_path, capsys):
    """kill -9 while orbax writes a training checkpoint (paused just before it renames the finished save into
    place) leaves its unfinished save; `svd-jax clean OUTPUT_DIR` and the next run (which opens the checkpoints to
    resume) remove it, but not while a live run holds the folder."""
    from svd_jax.cli import main
    from svd_jax.train.checkpoints import IN_USE, Checkpoints

    child = start(SAVE, tmp_path / "run" / "checkpoints")
    wait_for_line(child, "PAUSED")
    child.kill()
    child.wait()
    unfinished = [IN_USE, "1", "2.orbax-checkpoint-tmp"]
    assert leftovers(tmp_path / "run" / "checkpoints") == unfinished
    copy = tmp_path / "copy" / "checkpoints"
    live = Checkpoints(copy, keep=2)  # a run still going in another folder, with the same save in flight
    for name in unfinished[1:]:
        shutil.copytree(tmp_path / "run" / "checkpoints" / name, copy / name)
    assert main(["clean", str(tmp_path / "copy")]) == 0
    assert leftovers(copy) == unfinished
    live.close()
    assert main(["clean", str(tmp_path / "copy")]) == 0
    assert leftovers(copy) == [IN_USE, "1"]
    assert capsys.readouterr().out.splitlines()[-1].startswith("1 leftover of stopped runs removed")

    resumed = Checkpoints(tmp_path / "run" / "checkpoints", keep=2)
    assert leftovers(tmp_path / "run" / "checkpoints") == [IN_USE, "1"] and resumed.latest() == 1
    resumed.close()


LOAD = """import sys
import convert
{pause}
import svd_jax
print("LOADING", flush=True)
models = svd_jax.load(sys.argv[1], components=["image_encoder"])
print("LOADED", models.path, flush=True)
"""


def test_two_processes_convert_a_source_once(tmp_path, clip_folder):
    """The first process converts while holding a lock; the second waits for it and loads the result."""
    env = {"SVD_JAX_CACHE": str(tmp_path / "cache"), "GATE": str(tmp_path / "gate")}
    first = start(LOAD.format(pause="pause_at(convert, 'convert', 'CONVERTING')"), clip_folder, env=env)
    wait_for_line(first, "CONVERTING")
    never = "def refuse(*args, **kwargs):\n    raise SystemExit('converted twice')\nconvert.convert = refuse"
    second = start(LOAD.format(pause=never), clip_folder, env=env)
    wait_for_line(second, "LOADING")
    time.sleep(1.0)
    assert second.poll() is None, second.communicate()  # waiting for the first one's lock
    (tmp_path / "gate").touch()
    results = [first.communicate(timeout=120), second.communicate(timeout=120)]
    assert first.returncode == 0 and second.returncode == 0, results
    converted = [p.name for p in (tmp_path / "cache" / "converted").iterdir() if not p.name.startswith(".")]
    assert len(converted) == 1
    assert all(out.split()[-1].endswith(converted[0]) for out, _ in results)


def test_conversion_cache_follows_the_contents(tmp_path, clip_folder, monkeypatch):
    """A source whose weights change (same size, same modification time) is converted again."""
    from svd_jax import loader

    monkeypatch.setenv("SVD_JAX_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "image_encoder"
    shutil.copytree(clip_folder, source)
    first = loader.resolve(source)
    weights = source / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)  # the last float of the last tensor becomes 0
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = loader.resolve(source)
    assert second != first and loader.resolve(source) == second
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    assert loader.resolve(copy).name.split("-")[-1] == second.name.split("-")[-1]  # same contents, same key


def test_clean_removes_only_leftovers_of_stopped_processes(tmp_path, capsys):
    import subprocess

    from svd_jax.cli import main

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = [tmp_path / f".dst.partial-{host}-{dead.pid}", tmp_path / f".video.old-{host}-{dead.pid}"]
    live = [tmp_path / f".dst.partial-{host}-{os.getpid()}", tmp_path / f".dst.partial-elsewhere-{dead.pid}",
            tmp_path / "keep", tmp_path / ".dst.partial-notes"]
    for path in stale + live:
        path.mkdir()
        (path / "data").write_text("x")
    stale_files = [tmp_path / f".clip.mp4.partial-{host}-{dead.pid}.mp4",  # a video and its settings file
                   tmp_path / f".clip.mp4.json.partial-{host}-{dead.pid}"]
    live_files = [tmp_path / f".clip.gif.partial-{host}-{os.getpid()}.gif", tmp_path / "clip.mp4.partial-1.mp4",
                  tmp_path / f".notes.old-{dead.pid}.txt", tmp_path / f".report.partial-{dead.pid}.txt"]  # a user's
    for path in stale_files + live_files:
        path.write_text("x")
    assert main(["clean", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in live + live_files)
    assert capsys.readouterr().out.splitlines()[-1].startswith("4 leftovers of stopped runs removed")
