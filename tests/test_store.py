"""svd_jax.store: atomic_dir (the one way a folder is written) and the converted-folder format's writers."""

import pathlib

import pytest

import svd_jax
from svd_jax import store
from svd_jax.train.checkpoints import save_models


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with store.atomic_dir(dst) as folder:
            (folder / "new.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert [p.name for p in dst.iterdir()] == ["old.txt"] and _hidden(tmp_path) == []
    with store.atomic_dir(dst) as folder:
        (folder / "new.txt").write_text("new")
    assert [p.name for p in dst.iterdir()] == ["new.txt"] and _hidden(tmp_path) == []
    with pytest.raises(FileExistsError, match="already exists"):
        with store.atomic_dir(dst, replace=False):
            pass


def test_failed_rename_keeps_the_previous_folder(tmp_path, monkeypatch):
    """The last step can fail too (a full or read-only disk): the previous destination is put back."""
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    rename = pathlib.Path.rename

    def failing(self, target):
        if ".partial-" in self.name:
            raise OSError("rename refused")
        return rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", failing)
    with pytest.raises(OSError, match="rename refused"):
        with store.atomic_dir(dst) as folder:
            (folder / "new.txt").write_text("new")
    assert (dst / "old.txt").read_text() == "old" and _hidden(tmp_path) == []


def test_exported_models_replace_a_folder_atomically(tmp_path, monkeypatch):
    vae = svd_jax.load("tiny", policy=svd_jax.Policy.float32()).vae
    dst = save_models(tmp_path / "model", {"vae": vae}, {"steps": 1})
    manifest = store.read_manifest(dst)
    assert manifest["format"] == store.FORMAT and set(manifest["components"]) == {"vae"}
    store.verify_component(dst, manifest, "vae")
    assert store.read_config(dst / "vae", "vae") == vae.config
    before = store.component_sha256(dst / "vae")
    rename = pathlib.Path.rename
    monkeypatch.setattr(pathlib.Path, "rename", lambda self, target: (_ for _ in ()).throw(OSError("disk full"))
                        if ".partial-" in self.name else rename(self, target))
    with pytest.raises(OSError, match="disk full"):
        save_models(dst, {"vae": vae}, {"steps": 2})
    assert store.read_manifest(dst)["source"]["fine_tuned"] == {"steps": 1}
    assert store.component_sha256(dst / "vae") == before and _hidden(tmp_path) == []
