"""Bad input to the converter: one clear line naming the problem, exit code 2, nothing left on disk."""

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from convert.__main__ import main
from parity import convert_cli, tiny_clip_folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("src"))


def run_main(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_clean_failure(code, err, dst, *needles):
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")], "partial output left behind"


def test_missing_source(tmp_path, capsys):
    code, err = run_main(capsys, tmp_path / "nope", tmp_path / "dst")
    assert_clean_failure(code, err, tmp_path / "dst", "nope", "no such file")


def test_not_safetensors(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_text("this is not a checkpoint")
    code, err = run_main(capsys, bad, tmp_path / "dst")
    assert_clean_failure(code, err, tmp_path / "dst", str(bad), "not a safetensors file")


def test_truncated_file(tmp_path, capsys, clip_folder):
    data = (clip_folder / "model.safetensors").read_bytes()
    cut = tmp_path / "model.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    code, err = run_main(capsys, cut, tmp_path / "dst")
    assert_clean_failure(code, err, tmp_path / "dst", str(cut), "truncated")


def test_checkpoint_of_another_model(tmp_path, capsys):
    other = tmp_path / "resnet.safetensors"
    save_file({"fc.weight": np.zeros((2, 3), np.float32), "conv1.weight": np.zeros((4, 3, 3, 3), np.float32)}, other)
    code, err = run_main(capsys, other, tmp_path / "dst")
    assert_clean_failure(code, err, tmp_path / "dst", str(other), "not an SVD checkpoint")


def _copy_with(clip_folder, dst_folder, change):
    from safetensors.torch import load_file, save_file as save_torch

    tensors = load_file(clip_folder / "model.safetensors")
    change(tensors)
    dst_folder.mkdir()
    save_torch(tensors, dst_folder / "model.safetensors")
    (dst_folder / "config.json").write_text((clip_folder / "config.json").read_text())
    return dst_folder


def test_wrong_shape(tmp_path, capsys, clip_folder):
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    src = _copy_with(clip_folder, tmp_path / "image_encoder", lambda t: t.__setitem__(key, torch.zeros(38, 32)))
    code, err = run_main(capsys, src, tmp_path / "dst")
    assert_clean_failure(code, err, tmp_path / "dst", key, "[38, 32]", "[37, 32]")


def test_missing_and_unexpected_keys(tmp_path, capsys, clip_folder):
    key = "vision_model.encoder.layers.0.self_attn.k_proj.bias"

    def change(t):
        t["vision_model.encoder.layers.0.self_attn.extra.weight"] = t.pop(key)

    src = _copy_with(clip_folder, tmp_path / "image_encoder", change)
    code, err = run_main(capsys, src, tmp_path / "dst")
    assert_clean_failure(code, err, tmp_path / "dst", "missing 1 keys", key, "unexpected 1 keys", "extra.weight")


def test_component_in_the_wrong_folder(tmp_path, capsys, clip_folder):
    """A folder named vae/ that holds an image encoder is refused, not converted as something else."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(clip_folder, repo / "vae")
    code, err = run_main(capsys, repo, tmp_path / "dst")
    assert_clean_failure(code, err, tmp_path / "dst", "image_encoder", "vae")


def test_existing_destination_needs_force(tmp_path, clip_folder):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    result = convert_cli(clip_folder, dst, "--no-hash", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {dst} already exists (pass --force to replace it)"]
    assert (dst / "keep.txt").read_text() == "mine"
    convert_cli(clip_folder, dst, "--no-hash", "--force")
    assert not (dst / "keep.txt").exists() and (dst / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]


def test_failure_while_writing_leaves_nothing(tmp_path, capsys, clip_folder, monkeypatch):
    import errno

    from svd_jax import checkpoint

    def explode(folder, params):
        raise OSError(errno.EROFS, "Read-only file system", str(folder / "params"))

    monkeypatch.setattr(checkpoint, "save_params", explode)
    code, err = run_main(capsys, clip_folder, tmp_path / "dst")
    assert_clean_failure(code, err, tmp_path / "dst", f"{tmp_path / 'dst' / 'image_encoder' / 'params'}: Read-only")
    assert list(tmp_path.iterdir()) == []


def test_failure_while_reading_a_tensor_leaves_nothing(tmp_path, capsys, clip_folder, monkeypatch):
    """Tensors are read while the checkpoint is written: a read that fails half-way (the file changed) still ends
    with one error line and nothing on disk."""
    from convert import reader

    read, calls = reader.SafetensorsFile.get, []

    def fail_third(self, key):
        calls.append(key)
        if len(calls) == 3:
            raise reader.ConversionError(f"{self.path}: cannot read tensor {key!r} (the file ends early)")
        return read(self, key)

    monkeypatch.setattr(reader.SafetensorsFile, "get", fail_third)
    code, err = run_main(capsys, clip_folder, tmp_path / "dst")
    assert_clean_failure(code, err, tmp_path / "dst", "the file ends early")
    assert len(calls) == 3  # nothing is read after the failure


def test_missing_destination_parent(tmp_path, capsys, clip_folder):
    code, err = run_main(capsys, clip_folder, tmp_path / "no" / "dst")
    assert code == 2 and "parent folder does not exist" in err
    assert not (tmp_path / "no").exists()


def test_manifest_records_sources(tmp_path, clip_folder):
    import json

    convert_cli(clip_folder, tmp_path / "dst")
    manifest = json.loads((tmp_path / "dst" / "manifest.json").read_text())
    (entry,) = manifest["source"]["files"]
    assert entry["name"] == "model.safetensors" and len(entry["sha256"]) == 64
    assert manifest["components"]["image_encoder"]["config"]["hidden_size"] == 32


def _raw_safetensors(path, header: bytes, data: bytes = b"\0" * 64):
    import struct

    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("header", [
    b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}',
    b'{"w": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}',
    b'{"w": {"dtype": "F32", "shape": [-4], "data_offsets": [16, 0]}}',
    b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [true, 17]}}',
    b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]}}',
    b'{"w": {"dtype": 7, "shape": [4], "data_offsets": [0, 16]}}',
    b'{"w": [1, 2]}',
    b'{"w": {"dtype": "F32", "shape": [4000000000000000000000], "data_offsets": [0, 16]}}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
], ids=["string-offsets", "string-shape", "negative", "bool-offset", "three-offsets", "dtype-type", "entry-list",
        "huge-shape", "nested-lists", "nested-objects"])
def test_hostile_safetensors_header(tmp_path, capsys, header):
    src = _raw_safetensors(tmp_path / "model.safetensors", header)
    code, err = run_main(capsys, src, tmp_path / "dst")
    assert_clean_failure(code, err, tmp_path / "dst", str(src), "not a safetensors file" if header[:1] == b"["
                         or header.startswith(b'{"a"') else "header")


def _retyped(clip_folder, tmp_path, key, change):
    """A copy of the tiny image encoder folder with one tensor replaced (safetensors keeps the dtype given)."""
    from safetensors.numpy import load_file

    tensors = load_file(clip_folder / "model.safetensors")
    tensors[key] = change(tensors[key])
    folder = tmp_path / "image_encoder"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text((clip_folder / "config.json").read_text())
    return folder


@pytest.mark.parametrize("change, needles", [
    (lambda a: a.astype(np.int32), ["I32", "floating point"]),
    (lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan, a).astype(a.dtype), ["1 non-finite"]),
    (lambda a: np.full_like(a, np.inf), ["non-finite"]),
], ids=["int32", "nan", "inf"])
def test_weights_must_be_finite_floats(tmp_path, capsys, clip_folder, change, needles):
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    src = _retyped(clip_folder, tmp_path, key, change)
    code, err = run_main(capsys, src, tmp_path / "dst")
    assert_clean_failure(code, err, tmp_path / "dst", key, *needles)


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
@pytest.mark.parametrize("direction", ["convert", "export"])
def test_destination_never_overlaps_the_source(tmp_path, capsys, clip_folder, where, direction):
    import shutil

    src = tmp_path / "repo" / "image_encoder"
    shutil.copytree(clip_folder, src)
    if direction == "export":  # a converted folder, exported back onto itself
        assert main([str(src), str(tmp_path / "converted"), "--no-hash"]) == 0
        src = tmp_path / "converted"
    before = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*"))
    dst = {"same": src, "inside": src / "out", "containing": src.parent}[where]
    extra = ["--to-diffusers"] if direction == "export" else []
    code, err = run_main(capsys, src, dst, "--force", *extra)
    relation = {"same": "is", "inside": "is inside", "containing": "contains"}[where]
    assert code == 2 and err.splitlines() == [f"error: {dst} {relation} the source {src}: choose a destination "
                                              "outside it"], err
    assert sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("config, needles", [
    ("vae", ["config for AutoencoderKLTemporalDecoder, not for the image_encoder"]),
    ({"hidden_size": "32"}, ["'hidden_size' must be an integer, got '32'"]),
    ({"hidden_size": 32.0}, ["'hidden_size' must be an integer, got 32.0"]),
    ({"num_attention_heads": 0}, ["'num_attention_heads' must be between 1"]),
    ({"num_hidden_layers": 10 ** 7}, ["'num_hidden_layers' must be between 1 and 64"]),
    ({"layer_norm_eps": "small"}, ["'layer_norm_eps' must be a finite number"]),
    ([1, 2], ["not a JSON object"]),
    ("nested", ["RecursionError"]),
], ids=["vae-config", "string-int", "float-int", "zero-heads", "huge-layers", "string-float", "list", "nested"])
def test_bad_source_config(tmp_path, capsys, clip_folder, config, needles):
    import json
    import shutil

    src = tmp_path / "image_encoder"
    shutil.copytree(clip_folder, src)
    if isinstance(config, dict):
        text = json.dumps({**json.loads((clip_folder / "config.json").read_text()), **config})
    else:
        text = {"vae": json.dumps({"_class_name": "AutoencoderKLTemporalDecoder", "block_out_channels": [32, 64]}),
                "nested": "[" * 100_000 + "]" * 100_000}.get(str(config)) or json.dumps(config)
    (src / "config.json").write_text(text)
    code, err = run_main(capsys, src, tmp_path / "dst")
    assert_clean_failure(code, err, tmp_path / "dst", str(src / "config.json"), *needles)


def test_disk_full_while_writing(tmp_path, clip_folder):
    """A real write failure from orbax's storage layer (files limited to 3000 bytes, as a full disk refuses
    them): one line naming the checkpoint under its final name, exit 2, nothing left."""
    import subprocess
    import sys

    from parity import REPO

    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000)); "
              "from convert.__main__ import main; sys.exit(main(sys.argv[1:]))")
    dst = tmp_path / "dst"
    result = subprocess.run([sys.executable, "-c", script, str(clip_folder), str(dst), "--no-hash"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: {dst / 'image_encoder' / 'params'}: cannot write the checkpoint "
                                          "(File too large)"], result.stderr
    assert list(tmp_path.iterdir()) == []
