"""A converted folder that is corrupted, edited or malformed: load() and `svd-jax info` refuse it with one line
naming the file, before any weight is used."""

import json
import shutil

import pytest
from transformers import CLIPVisionConfig as HFCLIPVisionConfig
from transformers import CLIPVisionModelWithProjection

import svd_jax
from parity import convert_inprocess, randomize
from svd_jax.cli import main as cli
from svd_jax.configs import VAEConfig


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted folder holding a tiny image encoder."""
    root = tmp_path_factory.mktemp("load_errors")
    config = HFCLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=24, num_hidden_layers=2,
                                num_attention_heads=4, image_size=30, patch_size=10)
    randomize(CLIPVisionModelWithProjection(config)).save_pretrained(root / "image_encoder")
    convert_inprocess(root / "image_encoder", root / "converted", "--no-hash")
    return root / "converted"


@pytest.fixture
def copy(converted, tmp_path):
    shutil.copytree(converted, tmp_path / "copy")
    return tmp_path / "copy"


def _refused(folder, *needles, **load_options):
    with pytest.raises(ValueError) as error:
        svd_jax.load(folder, **load_options)
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, message
    return message


def _data_files(folder):
    files = (folder / "image_encoder" / "params").rglob("*")
    return sorted(p for p in files if p.is_file() and p.stat().st_size > 1000)


def test_intact_folder_loads(copy):
    models = svd_jax.load(copy)
    assert models.image_encoder is not None and models.manifest["components"]["image_encoder"]["sha256"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "metadata", "add", "config"])
def test_damaged_component_is_refused(copy, damage):
    """One flipped byte in the weights (which would otherwise load as a wild value), a truncated or deleted data
    file, a missing _METADATA, a stray file, a config edited to other same-shape values."""
    data = _data_files(copy)[0]
    if damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x40
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-10])
    elif damage == "delete":
        data.unlink()
    elif damage == "metadata":
        (copy / "image_encoder" / "params" / "_METADATA").unlink()
    elif damage == "add":
        (copy / "image_encoder" / "params" / "extra").write_text("x")
    else:
        path = copy / "image_encoder" / "config.json"
        path.write_text(path.read_text().replace('"layer_norm_eps": 1e-05', '"layer_norm_eps": 0.1'))
    _refused(copy, str(copy / "image_encoder"), "differ from the checksum")


def test_verify_false_skips_the_checksum(copy):
    path = copy / "image_encoder" / "config.json"
    path.write_text(path.read_text().replace('"layer_norm_eps": 1e-05', '"layer_norm_eps": 0.1'))
    assert svd_jax.load(copy, verify=False).image_encoder.config.layer_norm_eps == 0.1


@pytest.mark.parametrize("manifest, needle", [
    ([], "not a readable manifest (not a JSON object)"),
    ("[" * 100_000 + "]" * 100_000, "not a readable manifest (RecursionError)"),
    ("{", "not a readable manifest (JSONDecodeError)"),
    ({"format": "svd_jax", "components": []}, "not an svd_jax manifest"),
    ({"format": "other", "components": {}}, "not an svd_jax manifest"),
    ({"format": "svd_jax", "converter_version": "99", "components": {}}, "converter version '99'"),
], ids=["list", "nested", "broken", "components-list", "format", "version"])
def test_malformed_manifest(copy, capsys, manifest, needle):
    (copy / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    _refused(copy, str(copy / "manifest.json"), needle)
    assert cli(["info", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith("error: ") and needle in err


@pytest.mark.parametrize("change, needle", [
    ("vae", "holds a vae config, not the image_encoder's"),
    ({"hidden_size": "32"}, "'hidden_size' must be an integer, got '32'"),
    ({"hidden_size": 32.0}, "'hidden_size' must be an integer, got 32.0"),
    ({"num_attention_heads": 0}, "'num_attention_heads' must be between 1"),
    ({"num_hidden_layers": 10 ** 7}, "'num_hidden_layers' must be between 1 and 64"),
    ({"kind": ["unhashable"]}, "unhashable"),
], ids=["vae-config", "string-int", "float-int", "zero-heads", "huge-layers", "kind-list"])
def test_bad_stored_config(copy, change, needle):
    """Checked on read, before any model is built (verify=False: the checksum would refuse them first)."""
    path = copy / "image_encoder" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(VAEConfig.tiny().to_dict() if change == "vae" else {**config, **change}))
    _refused(copy, str(path), needle, verify=False)


@pytest.mark.parametrize("damage", ["truncate", "halve", "empty", "delete", "metadata"])
def test_damaged_checkpoint_without_verify_is_one_line(copy, damage):
    """Skipping the checksum, orbax's own failure to read is still one line naming the checkpoint (also when orbax
    wraps the storage layer's error in its own "Encountered error while reading array index")."""
    data = _data_files(copy)[0]
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:-10])
    elif damage in ("halve", "empty"):  # the largest file: array data (the first may be an index)
        largest = max(_data_files(copy), key=lambda p: p.stat().st_size)
        largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2] if damage == "halve" else b"")
    elif damage == "delete":
        data.unlink()
    else:
        (copy / "image_encoder" / "params" / "_METADATA").unlink()
    with pytest.raises(OSError) as error:
        svd_jax.load(copy, verify=False)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "cannot read the checkpoint" in message, message
    assert str(copy / "image_encoder" / "params") in message


def test_export_refuses_a_damaged_folder(copy, tmp_path, capsys):
    """--to-diffusers checks the checksums as load does: a flipped byte is not exported as valid-looking weights."""
    from convert.__main__ import main as convert_main

    data = _data_files(copy)[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert convert_main(["--to-diffusers", str(copy), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {copy / 'image_encoder'}: its files differ from the checksum recorded when it was "
                   "written (corrupted or edited); convert the source again (svd_jax.load(..., verify=False) "
                   "skips this check)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
