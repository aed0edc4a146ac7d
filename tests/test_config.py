import dataclasses

import pytest

from g4v_jax.config import Config, ConfigError, load_config, parse_overrides


def test_named_configs_load():
    tiny = load_config("tiny")
    big = load_config("gpt4video_7b")
    assert isinstance(tiny, Config)
    assert big.model.vision.hidden_size == 1024 and big.model.vision.num_layers == 24
    assert big.model.vision.num_positions == 257
    assert big.model.abstractor.num_query_tokens == 64 and big.model.abstractor.num_layers == 6
    assert big.model.num_frames == 4 and big.model.llm_hidden_size == 4096
    assert big.model.num_video_tokens == 65
    assert big.mesh.fsdp == 8
    assert tiny.train.learning_rate == pytest.approx(1e-4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.model.num_frames = 8


def test_base_inheritance_and_includes():
    cfg = load_config({"model": "model/clip_vit_l14.yaml", "mesh": "mesh/fsdp_tp.yaml"})
    assert cfg.model.abstractor.variant == "paper"
    assert cfg.model.abstractor.frame_embeddings == 8
    assert cfg.model.vision.temporal_adapter is False
    assert cfg.model.vision.hidden_size == 1024  # inherited from gpt4video_7b.yaml
    assert (cfg.mesh.fsdp, cfg.mesh.tensor) == (-1, 2)


def test_overrides_parse_yaml_values():
    cfg = load_config("tiny", ["model.vision.num_layers=3", "train.learning_rate=2e-5",
                               "model.abstractor.variant=paper", "model.vision.temporal_adapter=false"])
    assert cfg.model.vision.num_layers == 3
    assert cfg.train.learning_rate == pytest.approx(2e-5)  # "2e-5" is a string to YAML: coerced to float
    assert cfg.model.abstractor.variant == "paper"
    assert cfg.model.vision.temporal_adapter is False
    assert parse_overrides(["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.vision.num_layer=3", "unknown config key 'model.vision.num_layer'. Did you mean 'num_layers'?"),
        ("modle.num_frames=3", "unknown config key 'modle'"),
        ("model.vision.num_layers=two", "model.vision.num_layers must be an integer"),
        ("model.abstractor.variant=perceiver", "abstractor.variant must be"),
        ("model.compute_dtype=float8", "model.compute_dtype must be"),
        ("model.vision.num_layers", "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert message in str(e.value)


def test_unknown_key_in_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  vision:\n    hidden: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.vision.hidden'.*Known keys here: .*hidden_size"):
        load_config(tmp_path / "bad.yaml")


def test_missing_include(tmp_path):
    (tmp_path / "c.yaml").write_text("mesh: mesh/nope.yaml\n")
    with pytest.raises(ConfigError, match="mesh/nope.yaml"):
        load_config(tmp_path / "c.yaml")


def test_a_section_override_can_name_a_file():
    cfg = load_config("gpt4video_7b", ["train=train/stage2.yaml", "mesh=mesh/dp8.yaml", "train.epochs=1"])
    assert cfg.train.stage == "stage2" and cfg.train.learning_rate == pytest.approx(2e-5)
    assert cfg.train.epochs == 1 and cfg.mesh.data == 8 and cfg.mesh.fsdp == 1


def test_the_data_pipelines_model_inputs_are_not_config_keys(tmp_path):
    """One DataConfig: its fields that the model and the stage decide (num_frames, use_videos, ...) are filled by
    ``pipeline_config``, refused in a config (naming where they come from) and never saved."""
    from g4v_jax.config import Config, ConfigError, DataConfig, dump_config, from_dict, load_config
    from g4v_jax.data.pipeline import pipeline_config

    with pytest.raises(ConfigError, match="'data.num_frames' is not set in a config: it comes from model.num_frames"):
        from_dict(Config, {"data": {"num_frames": 8}})
    cfg = load_config("tiny")
    dump_config(cfg, tmp_path / "c.yaml")
    assert "num_frames" not in (tmp_path / "c.yaml").read_text().split("data:")[1].split("\nmodel:")[0]
    resolved = pipeline_config(cfg)
    assert isinstance(resolved, DataConfig) and resolved.num_frames == cfg.model.num_frames
    assert resolved.num_video_tokens == cfg.model.num_video_tokens and resolved.seq_len == cfg.data.seq_len
