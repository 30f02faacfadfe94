"""LoRA on a tiny model: new adapters change nothing; training moves only the adapters (float32, with their own
optimizer state) over a base frozen in the compute dtype, lowers the loss on a fixed batch and resumes bit for
bit; the adapter file is small, loads merged or unmerged with ``svd_jax.load(..., lora=)`` (the two agreeing),
and is read by PEFT into diffusers' UNet, where it computes what svd_jax computes, as does the merged
``--to-diffusers`` export."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel as TorchUNet
from diffusers.loaders.peft import PeftAdapterMixin
from flax import nnx
from safetensors.numpy import save_file

import svd_jax
from convert.__main__ import main as convert_main
from parity import max_rel_err
from svd_jax import lora
from svd_jax.checkpoint import path_key
from svd_jax.components import abstract_model
from svd_jax.configs import UNetConfig
from svd_jax.train.config import config_from_dict
from svd_jax.train.trainer import Trainer
from train_helpers import UNET, random_model, write_base_model, write_frame_folders

STEPS = 30


def _config(root, base, data, name, **changes):
    values = {
        "model": str(base), "output_dir": str(root / name), "steps": STEPS, "batch_size": 2, "seed": 5,
        "compute_dtype": "float32", "remat": False, "checkpoint_every": 1000, "log_every": 10,
        "data": {"path": str(data), "num_frames": 3, "height": 32, "width": 32},
        "objective": {"latent_sample": False, "p_std": 1.0},
        "optimizer": {"learning_rate": 5e-3, "warmup_steps": 5},
        "lora": {"rank": 4, "alpha": 8},
    }
    for key, value in changes.items():
        section, _, leaf = key.rpartition(".")
        (values[section] if section else values)[leaf] = value
    return config_from_dict(values)


def _unet_inputs(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], (2, 3, 8, 8, 8)), jnp.array([0.3, -0.7]), jax.random.normal(k[1], (2, 1, 16)),
            jnp.array([[6.0, 127.0, 0.02], [3.0, 20.0, 0.1]]))


_forward_jit = jax.jit(lambda graphdef, state, inputs: nnx.merge(graphdef, state)(*inputs), static_argnums=0)


def _out(module, inputs) -> np.ndarray:
    """The module's output, jitted (compiled once per module structure; scales and weights are arguments)."""
    graphdef, state = nnx.split(module)
    return np.asarray(_forward_jit(graphdef, state, inputs))


def test_new_adapters_change_nothing_and_targets_are_chosen_by_name():
    unet = random_model("unet", UNET, 0)
    inputs = _unet_inputs()
    expected = _out(unet, inputs)
    attention = lora.add_adapters(unet, rank=3, alpha=6.0)
    assert len(attention) == 32 and all(".transformer_blocks.0.attn" in p and "temporal" not in p for p in attention)
    assert {p.rsplit(".", 1)[-1] for p in attention} == {"to_q", "to_k", "to_v", "0"}
    more = lora.add_adapters(unet, rank=3, alpha=6.0, targets=["feed_forward", "temporal", r"\.proj_in$"])
    assert any(p.endswith("ff.net.0.proj") for p in more) and any(p.endswith("proj_in") for p in more)
    assert any("temporal_transformer_blocks.0.ff_in" in p for p in more) and not set(more) & set(attention)
    assert np.array_equal(_out(unet, inputs), expected)  # zero up-projections: the base model exactly
    with pytest.raises(ValueError, match="no linear layer matches"):
        lora.add_adapters(unet, rank=3, alpha=6.0, targets=["no_such_layer"])


def test_adapter_dropout_draws_from_the_step_key_in_training_only():
    base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    layer = lora.LoRALinear(base, jnp.ones((6, 2)), jnp.ones((2, 5)), alpha=2.0, dropout=0.5)
    x = jnp.ones((3, 6))
    plain = base(x) + 2.0 / 2 * x @ jnp.ones((6, 2)) @ jnp.ones((2, 5))
    outputs = []
    for seed in (0, 1):
        graphdef, state = nnx.split(layer)
        flat = lora.fresh_dropout_keys({path_key(p): v.get_value() for p, v in nnx.to_flat_state(state)},
                                       jax.random.key(seed))
        for p, v in nnx.to_flat_state(state):
            v.set_value(flat[path_key(p)])
        outputs.append(np.asarray(nnx.merge(graphdef, state)(x)))
    assert not np.allclose(outputs[0], plain) and not np.allclose(outputs[0], outputs[1])
    layer.eval()
    assert np.allclose(layer(x), plain, rtol=1e-6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return root, write_base_model(root / "base"), write_frame_folders(root / "data", videos=2, frames=3)


@pytest.fixture(scope="module")
def trained(setup):
    """A rank-4 attention LoRA trained for STEPS steps, with the fixed-batch loss before and after."""
    root, base, data = setup
    trainer = Trainer(_config(root, base, data, "run"), progress=False)
    features = trainer.features(trainer.clips.batch(0, 2))
    keys = [jax.random.key(100 + i) for i in range(8)]

    def fixed_loss():
        return float(np.mean([trainer.step_fn.evaluate(trainer.state.params, trainer.frozen, trainer.vae_state,
                                                       features, k) for k in keys]))

    before = {k: np.asarray(v) for k, v in {**trainer.state.params, **trainer.frozen}.items()}
    loss_before = fixed_loss()
    rows = trainer.run()
    return trainer, before, loss_before, fixed_loss(), rows, trainer.export()


def test_training_moves_only_the_adapters_and_lowers_the_loss(trained):
    trainer, before, loss_before, loss_after, rows, _ = trained
    params, frozen = trainer.state.params, trainer.frozen
    assert params and all(k.endswith((".lora_a", ".lora_b")) for k in params)
    assert len(params) == 64  # A and B of q, k, v, out of both attentions of the 4 spatial transformer blocks
    assert not any("lora_a" in k or "lora_b" in k for k in frozen)
    moments = trainer.state.opt_state[1][0]  # adamw's ScaleByAdamState: exactly the adapters have moments
    assert set(moments.mu) == set(params) == set(moments.nu)
    assert {v.dtype for v in [*params.values(), *moments.mu.values(), *moments.nu.values()]} == {jnp.dtype("float32")}
    for key, value in frozen.items():
        assert np.array_equal(np.asarray(value), before[key]), key
    # Every adapter moved but the up-projections of the cross-attention's query and key: with a single context
    # token its softmax is identically 1, so they get exactly zero gradient (their A still decays: AdamW).
    unchanged = {k for k in params if np.array_equal(np.asarray(params[k]), before[k])}
    assert unchanged == {k for k in params if (".attn2.to_q." in k or ".attn2.to_k." in k) and k.endswith("_b")}
    print(f"fixed-batch loss {loss_before:.4f} -> {loss_after:.4f}")
    assert loss_after < 0.8 * loss_before and all(np.isfinite(r["loss"]) for r in rows)


def test_base_is_frozen_in_the_compute_dtype(setup):
    root, base, data = setup
    trainer = Trainer(_config(root, base, data, "bf16", compute_dtype="bfloat16"), progress=False)
    kernels = {k: v.dtype for k, v in trainer.frozen.items() if k.endswith(".kernel")}
    assert kernels and set(kernels.values()) == {jnp.dtype("bfloat16")}
    assert {v.dtype for v in trainer.state.params.values()} == {jnp.dtype("float32")}


def test_adapter_file_loads_merged_and_unmerged(setup, trained):
    root, base, _ = setup
    trainer, *_, path = trained
    assert path == trainer.output / "lora.safetensors"
    adapters = lora.read_adapters(path)
    assert adapters.settings["rank"] == 4 and adapters.settings["steps"] == STEPS
    assert adapters.base["model"] == str(base) and adapters.base["unet"]["config"] == UNET.to_dict()

    inputs = _unet_inputs(1)
    trained_out = _out(trainer.unet_module(), inputs)
    policy = svd_jax.Policy.float32()
    merged = svd_jax.load(base, policy, components=["unet"], lora=path).unet
    unmerged = svd_jax.load(base, policy, components=["unet"], lora=path, merge_lora=False).unet
    assert not lora.adapted_layers(merged) and len(lora.adapted_layers(unmerged)) == 32
    base_out = _out(svd_jax.load(base, policy, components=["unet"]).unet, inputs)
    unmerged_out = _out(unmerged, inputs)
    assert np.array_equal(unmerged_out, trained_out)
    err = max_rel_err(_out(merged, inputs), unmerged_out)
    print(f"merged vs unmerged {err:.2e}; adapters moved the output by {max_rel_err(unmerged_out, base_out):.2e}")
    assert err <= 1e-6 and max_rel_err(unmerged_out, base_out) > 1e-3
    lora.set_scale(unmerged, 0.0)
    assert np.array_equal(_out(unmerged, inputs), base_out)
    half = svd_jax.load(base, policy, components=["unet"], lora=path, lora_scale=0.5).unet
    lora.set_scale(unmerged, 0.5)
    assert max_rel_err(_out(half, inputs), _out(unmerged, inputs)) <= 1e-6


def test_rank_4_adapter_file_is_under_2_percent_of_the_full_size_unet(tmp_path):
    """Written for the full-size SVD-XT UNet's attention layers (built abstractly: no weights), against that
    UNet's weights in float16, the dtype it is distributed in."""
    unet = abstract_model("unet", UNetConfig.svd_xt())
    _, params, _ = nnx.split(unet, nnx.Param, ...)
    unet_bytes = sum(2 * int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(params))
    names = sorted(p for p, layer in lora.linear_layers(unet).items()
                   if re.search(lora.TARGET_GROUPS["attention"], p))
    layers = lora.linear_layers(unet)
    adapters = lora.Adapters({n: (np.zeros((layers[n].in_features, 4), np.float32),
                                  np.zeros((4, layers[n].out_features), np.float32)) for n in names},
                             dict.fromkeys(names, 4.0), {}, {})
    lora.apply_adapters(unet, adapters, merge=False)
    path = lora.save_adapters(tmp_path / "lora.safetensors", unet, {"rank": 4}, {"unet": {"config": {}}})
    size = path.stat().st_size
    print(f"rank-4 attention adapters of SVD-XT: {size / 2**20:.1f} MiB, {size / unet_bytes:.3%} of the "
          f"{unet_bytes / 2**30:.2f} GiB float16 UNet ({len(names)} layers)")
    assert size < 0.02 * unet_bytes and len(names) == len(lora.read_adapters(path).layers)


def test_resume_with_dropout_continues_bit_for_bit(setup):
    root, base, data = setup
    changes = {"steps": 4, "lora": {"rank": 2, "dropout": 0.25}}
    whole = Trainer(_config(root, base, data, "whole", **changes), progress=False)
    rows = whole.run()
    first = Trainer(_config(root, base, data, "resumed", **{**changes, "steps": 2, "checkpoint_every": 2}),
                    progress=False)
    assert first.run() == rows[:2]
    del first
    second = Trainer(_config(root, base, data, "resumed", **changes), progress=False)
    assert second.restored_step == 2 and second.run() == rows[2:]
    for key, value in whole.state.params.items():
        assert np.array_equal(np.asarray(second.state.params[key]), np.asarray(value)), key


class _PeftUNet(TorchUNet, PeftAdapterMixin):
    """diffusers' SVD UNet with diffusers' PEFT adapter loading (the SVD pipeline has no LoRA loader)."""


def test_diffusers_reads_the_adapters_and_the_merged_export(setup, trained, tmp_path):
    root, base, _ = setup
    *_, path = trained
    assert convert_main(["--to-diffusers", str(base), str(tmp_path / "plain")]) == 0
    assert convert_main(["--to-diffusers", str(base), str(tmp_path / "merged"), "--lora", str(path)]) == 0
    torch_unet = _PeftUNet.from_pretrained(tmp_path / "plain" / "unet").eval()
    # (a folder and weight_name: given a file path, diffusers skips the safetensors header and with it alpha)
    torch_unet.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="unet", adapter_name="svd_jax")
    torch_merged = TorchUNet.from_pretrained(tmp_path / "merged" / "unet").eval()

    x, t, ctx, ids = (np.asarray(a) for a in _unet_inputs(2))
    with torch.no_grad():
        args = (torch.from_numpy(x).permute(0, 1, 4, 2, 3), torch.from_numpy(t))
        kwargs = {"encoder_hidden_states": torch.from_numpy(ctx), "added_time_ids": torch.from_numpy(ids)}
        with_adapters = torch_unet(*args, **kwargs).sample.permute(0, 1, 3, 4, 2).numpy()
        merged = torch_merged(*args, **kwargs).sample.permute(0, 1, 3, 4, 2).numpy()
    policy = svd_jax.Policy.float32()
    ours = _out(svd_jax.load(base, policy, components=["unet"], lora=path, merge_lora=False).unet, (x, t, ctx, ids))
    print(f"PEFT-loaded vs svd_jax {max_rel_err(with_adapters, ours):.2e}, merged export {max_rel_err(merged, ours):.2e}")
    assert max_rel_err(with_adapters, ours) <= 1e-4 and max_rel_err(merged, ours) <= 1e-4

    # and back: what PEFT holds, saved in diffusers' naming, reads as the same adapters
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(torch_unet, adapter_name="svd_jax")
    save_file({f"unet.{k}": v.numpy() for k, v in state.items()}, str(tmp_path / "from_peft.safetensors"))
    again, original = lora.read_adapters(tmp_path / "from_peft.safetensors"), lora.read_adapters(path)
    assert set(again.layers) == set(original.layers)
    for name, (a, b) in original.layers.items():
        assert np.array_equal(again.layers[name][0], a) and np.array_equal(again.layers[name][1], b)
    assert set(again.alpha.values()) == {4.0}  # no metadata: diffusers' convention alpha = rank
