"""Sharding: logical rules, and the vision tower + abstractor on a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices
equal the single-device result. The mesh run happens in a subprocess because the device count is fixed at JAX start."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jax.sharding import PartitionSpec as P

from g4v_jax.sharding import logical_to_spec

ROOT = Path(__file__).resolve().parents[1]


def test_logical_rules_without_mesh():
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_spec(("activation_batch", None)) == P(("data", "fsdp"), None)
    assert logical_to_spec(("norm",)) == P(None)


MESH_SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from g4v_jax.config import load_config, MeshConfig
    from g4v_jax.models.gpt4video import build_model
    from g4v_jax.sharding import make_mesh, shard_state, batch_sharding, logical_to_spec

    assert jax.device_count() == 8, jax.devices()
    cfg = load_config("tiny", ["model.vision.num_heads=4", "model.abstractor.num_heads=4"]).model
    model = build_model(cfg, seed=0)
    frames = np.random.default_rng(0).integers(0, 256, (4, 4, 56, 56, 3), dtype=np.uint8)
    mask = np.ones((4, 4), bool); mask[1, 3] = False
    expected = np.asarray(model.encode_videos(frames, mask))

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    # a logical axis that does not divide the mesh axis stays replicated
    assert logical_to_spec(("embed", "mlp"), (5, 64), mesh) == P(None, "tensor")
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        state = shard_state(state, mesh)
        kernel = state["vision_model"]["layers"][0]["mlp"]["fc1"]["kernel"].get_value()
        assert kernel.sharding.spec == P("fsdp", "tensor"), kernel.sharding
        assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (16, 32)
        frames_d = jax.device_put(frames, batch_sharding(mesh, 5))
        mask_d = jax.device_put(mask, batch_sharding(mesh, 2))

        @jax.jit
        def forward(state, frames, mask):
            return nnx.merge(graphdef, state).encode_videos(frames, mask)

        got = forward(state, frames_d, mask_d)
    diff = float(np.abs(np.asarray(got) - expected).max())
    print(f"mesh (2,2,2) vs single device: max|diff| {diff:.2e}")
    assert diff <= 1e-5, diff
    """
)


def test_forward_on_8_device_mesh_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout.strip())


FULL_MODEL_SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax
    from flax import nnx
    from g4v_jax.config import load_config, MeshConfig
    from g4v_jax.models.gpt4video import build_model
    from g4v_jax.sharding import make_mesh, shard_state, batch_sharding

    cfg = load_config("tiny").model
    model = build_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    k = cfg.num_video_tokens
    ids = rng.integers(3, cfg.llm.vocab_size, (4, 40)).astype(np.int32)
    ids[0, 5:5 + k] = -1; ids[2, 3:3 + k] = -1; ids[2, 20:20 + k] = -1; ids[3, 0:k] = -1  # rows 0, 2 (two), 3
    mask = np.ones((4, 40), bool); mask[1, 30:] = False
    frames = rng.integers(0, 256, (4, 2, cfg.num_frames, 56, 56, 3), dtype=np.uint8)  # (B, V, T, H, W, 3)
    graphdef, state = nnx.split(model)

    def forward(state, ids, frames, mask):
        return nnx.merge(graphdef, state)(ids, videos=frames, attention_mask=mask)[0]

    expected = np.asarray(jax.jit(forward)(state, ids, frames, mask))
    for axes in [(2, 2, 2), (1, 4, 2)]:
        mesh = make_mesh(MeshConfig(*axes))
        with jax.set_mesh(mesh):
            sharded = shard_state(state, mesh)
            put = lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim))
            got = np.asarray(jax.jit(forward)(sharded, put(ids), put(frames), put(mask)))
        diff = float(np.abs(got - expected).max())
        print(f"GPT4Video logits, mesh (data, fsdp, tensor)={axes} vs single device: max|diff| {diff:.2e}")
        assert diff <= 1e-4, diff
    """
)


def test_gpt4video_on_two_meshes_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", FULL_MODEL_SCRIPT], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout.strip())


GENERATE_SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax
    from flax import nnx
    from g4v_jax.config import load_config, MeshConfig
    from g4v_jax.inference.generate import SamplingConfig, generate
    from g4v_jax.models.gpt4video import build_model
    from g4v_jax.sharding import make_mesh, shard_state

    cfg = load_config("tiny").model
    model = build_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    k = cfg.num_video_tokens
    ids = rng.integers(3, cfg.llm.vocab_size, (2, 32)).astype(np.int32)
    ids[0, 2:2 + k] = -1
    mask = np.ones((2, 32), bool); mask[1, :5] = False
    batch = {"input_ids": ids, "attention_mask": mask,
             "videos": rng.integers(0, 256, (2, 1, cfg.num_frames, 56, 56, 3), dtype=np.uint8),
             "frame_mask": np.array([[[True] * cfg.num_frames], [[False] * cfg.num_frames]])}
    sampling = SamplingConfig(max_new_tokens=8)
    expected = generate(model, batch, sampling, eos_id=-1).tokens
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        sharded = nnx.merge(graphdef, shard_state(state, mesh))
        got = generate(sharded, batch, sampling, eos_id=-1).tokens
    print("tokens single", expected.tolist(), "mesh (1,4,2)", got.tolist())
    assert (got == expected).all()
    """
)


def test_generation_under_a_tensor_parallel_mesh_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", GENERATE_SCRIPT], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout.strip())


def test_a_mesh_config_overrides_the_logical_axis_rules():
    """``mesh.rules`` (a mesh YAML or ``mesh.rules.embed=[]``) replaces the defaults for the names it gives; a wrong
    name or mesh axis is a ConfigError that says so. The train state follows the override."""
    from g4v_jax.config import ConfigError, load_config
    from g4v_jax.sharding import DEFAULT_RULES, axis_rules, logical_to_spec

    cfg = load_config("tiny", ["mesh.rules={embed: [], mlp: [fsdp]}"])
    rules = axis_rules(cfg.mesh)
    assert rules["embed"] == () and rules["mlp"] == ("fsdp",) and rules["heads"] == DEFAULT_RULES["heads"]
    assert logical_to_spec(("embed", "mlp"), rules=rules) == P(None, "fsdp")
    for bad, match in (("{embbed: []}", "mesh.rules.embbed: no such logical axis"),
                       ("{embed: [model]}", r"mesh.rules.embed: \['model'\] are not mesh axes")):
        with pytest.raises(ConfigError, match=match):
            axis_rules(load_config("tiny", [f"mesh.rules={bad}"]).mesh)
    script = textwrap.dedent(
        """
        import jax
        from jax.sharding import PartitionSpec as P
        from g4v_jax.config import load_config
        from g4v_jax.train import build_trainer

        assert jax.device_count() == 8
        for rules, spec in (("{}", P("fsdp", None)), ("{embed: [], mlp: [fsdp]}", P(None, "fsdp"))):
            cfg = load_config("tiny", ["mesh.fsdp=8", f"mesh.rules={rules}", "model.llm.intermediate_size=64"])
            trainer = build_trainer(cfg, total_steps=1)
            kernel = trainer.frozen["language_model"]["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
            assert kernel.sharding.spec == spec, (rules, kernel.sharding.spec)
        """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
