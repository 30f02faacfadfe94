"""`svd-jax compile`: the generation's programs compiled for a target without running them (a TPU slice
described by libtpu on this CPU-only machine, and the local CPU), with their memory, FLOPs and attention kernel."""

import dataclasses
import json

import pytest

from svd_jax import cli, compile_plan, generation_plan


def run_compile(tmp_path, capsys, *args):
    out = tmp_path / "plan.json"
    assert cli.main(["compile", "--model", "tiny", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_compile_for_the_local_cpu(tmp_path, capsys):
    plan, table = run_compile(tmp_path, capsys, "--target", "cpu", "--height", "64", "--width", "96")
    assert plan["mesh_devices"] == 1 and plan["rows"] == 2 and plan["guided"]
    step = plan["step"]
    assert step["flops"] > 0 and step["temp_bytes"] > 0 and step["kernels"] == {}  # XLA attention on CPU
    assert plan["decode"]["flops"] > 0 and plan["fits"] is True
    assert "denoising step" in table and "fits          yes" in table and "VAE decode x2" in table


def test_tiny_step_compiles_for_a_tpu_v5e_slice_with_the_pallas_kernel(tmp_path, capsys):
    pytest.importorskip("libtpu")
    # 2 videos x 2 guidance halves: one row per chip of the 2x2 slice; 128x128 gives 256-token spatial attention
    plan, table = run_compile(tmp_path, capsys, "--target", "tpu:v5e:2x2", "--batch", "2", "--height", "128",
                              "--width", "128", "--no-decode", "--quick")
    assert plan["chip"] == "TPU v5e" and plan["memory_bytes"] == 16 * 2 ** 30
    assert plan["target_devices"] == 4 and plan["mesh_devices"] == 4 and plan["rows_per_device"] == 1
    assert plan["step"]["kernels"].get("pallas", 0) >= 1, plan["step"]  # the TPU flash kernel, inside shard_map
    assert plan["step"]["flops"] > 0 and plan["step_seconds_at_peak"] > 0 and plan["fits"] is True
    assert "pallas" in table and "compiled, not run" in table


def test_targets_and_meshes():
    assert compile_plan.mesh_size(4, rows=2) == 2  # guidance halves on two of four chips
    assert compile_plan.mesh_size(8, rows=4) == 4 and compile_plan.mesh_size(4, rows=3) == 3
    assert compile_plan.mesh_size(1, rows=2) == 1
    for bad in ("tpu:v9x:2x2", "tpu:v5e", "tpux", "gpu:0"):
        with pytest.raises(ValueError, match="--target"):
            compile_plan.resolve_target(bad)
    with pytest.raises(ValueError, match="--devices 3"):
        compile_plan.resolve_target("cpu", 3)


def test_bad_arguments_are_one_line(tmp_path, capsys):
    assert cli.main(["compile", "--target", "cpu", "--model", "tiny", "--height", "62"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --height"), err


def test_a_decode_that_does_not_fit_falls_back_to_a_chunk_that_does():
    cpu = compile_plan.resolve_target("cpu")
    size = dict(model="tiny", num_frames=4, height=64, width=96)
    models = compile_plan.abstract_models("tiny", compile_plan.POLICIES["bfloat16"]())
    two = generation_plan._decode_program(cpu, models, chunk=2, height=64, width=96, options=None)
    # a device that holds the 2-frame decode but not the 4-frame one the plan tries first
    small = dataclasses.replace(cpu, chip=compile_plan.Chip("small", two.peak_bytes, None))
    plan = generation_plan.plan_generation(small, **size)
    assert 1 <= plan.decode_chunk_size < 4 and plan.decode.fits(two.peak_bytes), plan.decode
    assert plan.notes and f"decode_chunk_size={plan.decode_chunk_size}" in plan.notes[-1]
    refused = dataclasses.replace(two, refused=True)  # what the TPU compiler would not build never fits
    assert refused.fits(10 * two.peak_bytes) is False and refused.fits(None) is None
