"""The command line explains itself: every option of every subcommand is described with its default, sizes are
checked by one rule before any model is loaded, and ``info`` says which component each source file became."""

import argparse
import re

import numpy as np
import PIL.Image
import pytest

from svd_jax import cli, loader


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def option_entries(help_text: str) -> dict[str, str]:
    """``{"--option": its help text}`` from a rendered ``--help`` (an entry runs until the next option)."""
    entries, current = {}, None
    for line in help_text.splitlines():
        match = re.match(r"^  (-\S.*?)(?:  |$)", line)  # "  -o OUTPUT, --output OUTPUT   help..."
        if match:
            current = max(re.findall(r"--?[\w-]+", match.group(1)), key=len)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_every_subcommand_is_listed():
    assert {"generate", "convert", "info", "train"} <= set(subcommands())


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_help_describes_every_option_and_its_default(name):
    parser = subcommands()[name]
    text = parser.format_help()
    entries = option_entries(text)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"svd-jax {name}: {action.option_strings or action.dest} has no help text"
        if not action.option_strings:
            continue  # positional: required, no default
        option = max(action.option_strings, key=len)
        assert option in entries, f"svd-jax {name} --help does not show {option}:\n{text}"
        assert "default" in entries[option], f"svd-jax {name} --help: {option} does not show its default: " \
                                             f"{entries[option]!r}"


def test_generate_help_shows_the_model_default():
    text = subcommands()["generate"].format_help()
    assert "stabilityai/stable-video-diffusion-img2vid-xt" in " ".join(text.split())


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    PIL.Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(path)
    return path


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any weights are built or restored."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(loader, "load", refuse)
    monkeypatch.setattr(loader, "random_models", refuse)
    monkeypatch.setattr(loader, "restore_model", refuse)


@pytest.mark.parametrize("size, needle", [
    (["--height", "100"], "height must be a positive multiple of 8"),
    (["--width", "570"], "width must be a positive multiple of 8"),
    (["--height", "0"], "height must be a positive multiple of 8"),
])
def test_size_errors_come_before_any_model_is_loaded(tmp_path, image, capsys, no_loading, size, needle):
    code = cli.main(["generate", str(image), "-o", str(tmp_path / "x.mp4"), "--model", "tiny", *size])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert needle in line
    assert not list(tmp_path.glob("*x.mp4*"))


def test_size_rule_of_a_converted_folder_is_checked_before_loading(tmp_path, image, capsys, monkeypatch):
    from svd_jax.configs import CLIPVisionConfig, UNetConfig, VAEConfig

    # a converted folder's manifest is all the check reads: the released models' configs, no weights
    components = {"image_encoder": {"config": CLIPVisionConfig.vit_h_14().to_dict()},
                  "unet": {"config": UNetConfig.svd_xt().to_dict()}, "vae": {"config": VAEConfig().to_dict()}}
    manifest = {"format": "svd_jax", "components": components}
    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / loader.MANIFEST).write_text(__import__("json").dumps(manifest))
    monkeypatch.setattr(loader, "load", lambda *a, **k: pytest.fail("loaded before checking the size"))
    code = cli.main(["generate", str(image), "-o", str(tmp_path / "x.mp4"), "--model", str(folder),
                     "--height", "576", "--width", "1000"])
    assert code == 2
    assert "width must be a positive multiple of 64" in capsys.readouterr().err


def test_info_names_each_source_files_component(tmp_path, capsys):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from parity import convert_inprocess, randomize

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=1,
                              num_attention_heads=4, image_size=224, patch_size=32)
    source = tmp_path / "pipe"
    randomize(CLIPVisionModelWithProjection(config)).save_pretrained(source / "image_encoder")
    convert_inprocess(source, tmp_path / "converted", "--no-hash")
    assert cli.main(["info", str(tmp_path / "converted")]) == 0
    out = capsys.readouterr().out
    assert "source image_encoder/model.safetensors -> image_encoder" in out, out


def test_a_size_that_cannot_fit_is_refused_up_front_with_the_figures(tmp_path, image, capsys, no_loading,
                                                                   monkeypatch):
    from svd_jax import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1 * memory.GIB)
    args = ["generate", str(image), "-o", str(tmp_path / "x.mp4"), "--model", "tiny", "--policy", "float32"]
    # the tiny model at the released models' size: its UNet attends over 288 x 512 latent tokens, in blocks of
    # 2**28 scores: 2 buffers x 4 bytes x 8 rows (2 guidance halves x 4 frames) x 4 heads x 56 queries x 147456
    assert cli.main([*args, "--height", "576", "--width", "1024"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert f"{2 * 4 * 8 * 4 * 56 * 147456 / 2**30:.1f} GiB" in line and "1.0 GiB" in line and "64x96" in line
    assert not list(tmp_path.glob("*x.mp4*"))


def test_converting_into_the_cache_says_where_and_how_big(tmp_path, capsys, monkeypatch):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from parity import randomize

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=1,
                              num_attention_heads=4, image_size=224, patch_size=32)
    randomize(CLIPVisionModelWithProjection(config)).save_pretrained(tmp_path / "pipe" / "image_encoder")
    monkeypatch.setenv("SVD_JAX_CACHE", str(tmp_path / "cache"))
    target = loader.resolve(tmp_path / "pipe")
    err = capsys.readouterr().err
    assert f"converting {tmp_path / 'pipe'} (" in err and f"into {target}" in err and "GiB" in err, err
    assert loader.resolve(tmp_path / "pipe") == target and capsys.readouterr().err == ""  # once


def test_hub_failure_names_the_current_login_command(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError, match="hf auth login"):
        loader.resolve("some-org/some-model")
