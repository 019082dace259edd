"""Config: YAML + overrides, and one clear ConfigError naming the field for bad input."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_latentcot.config import Config, ConfigError, config_from_dict, load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 128\ntrain:\n  lr: 3e-4\n")
    cfg = load_config(path, ["model.num_layers=6", "parallel.pipeline_layers=[2, 4]",
                             "parallel.pipeline_model_parallel_size=2", "model.init_std=null"])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.train.lr) == (128, 6, 3e-4)
    assert cfg.parallel.pipeline_layers == [2, 4] and cfg.model.init_std is None


def test_round_trip_through_yaml():
    cfg = load_config(None, ["latent.method=adaptive", "data.data_path=[0.5, a, 0.5, b]"])
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_example_configs_load():
    from pathlib import Path

    paths = sorted(Path(__file__).parents[1].glob("examples/configs/*.yaml"))
    assert paths
    for path in paths:
        assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("overrides,field", [
    (["model.hiden_size=3"], "hiden_size"),
    (["modle.hidden_size=3"], "modle"),
    (["model.hidden_size=abc"], "model.hidden_size"),
    (["model.hidden_size=1.5"], "model.hidden_size"),
    (["train.clip_grad=yes"], "train.clip_grad"),
    (["parallel.tensor_model_parallel_size=3"], "parallel.tensor_model_parallel_size"),
    (["model.num_layers=5", "parallel.pipeline_model_parallel_size=2"], "model.num_layers"),
    (["data.seq_length=4096"], "model.max_position_embeddings"),
    (["latent.method=magic"], "latent.method"),
    (["latent.tau=1.5"], "latent.tau"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], "train.global_batch_size"),
    (["data.split=a,b"], "data.split"),
    (["data.data_path=[0.5, a, 0.0]"], "data.data_path"),
    (["data.data_path=[0, a, 0, b]"], "data.data_path"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    (["model.num_query_groups=3"], "model.num_query_groups"),
    (["latent.pondering_embedding_scale=sqrt_d"], "latent.pondering_embedding_scale"),
    (["latent.method=pause", "parallel.pipeline_model_parallel_size=2"],
     "parallel.pipeline_model_parallel_size > 1"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


@pytest.mark.parametrize("blend,message", [
    ("[x, a, 0.5, b]", "blend weight 'x' is not a number"),
    ("[-1, a, 2, b]", r"blend weight -1\.0 must be >= 0"),
    ("[.nan, a, 1, b]", r"data\.data_path\[0\]: expected a finite number, got nan"),
    ("[.inf, a, 1, b]", r"data\.data_path\[0\]: expected a finite number, got inf"),
    ("[0, a, 0.0, b]", r"blend weights sum to zero"),
    ("[0.5, 0.5]", "expected a prefix after weight 0.5"),
])
def test_blend_weights_that_do_not_parse_or_sum_to_zero(blend, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"data.data_path={blend}"])


def test_vocab_smaller_than_tokenizer_is_an_error():
    from megatron_latentcot.vocab import padded_vocab_size

    cfg = load_config(None, ["model.vocab_size=100"])
    with pytest.raises(ConfigError, match="model.vocab_size"):
        padded_vocab_size(cfg.model, tokenizer_vocab=8192, tp_size=1)
    assert padded_vocab_size(load_config(None).model, 8000, tp_size=2) == 8192


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


_VALUES = st.one_of(st.integers(-5, 5000), st.floats(allow_nan=True), st.text(max_size=5),
                    st.booleans(), st.none(), st.lists(st.integers(), max_size=3))


@settings(max_examples=200, deadline=None)
@given(section=st.sampled_from(["model", "latent", "parallel", "data", "train", "bogus"]),
       key=st.sampled_from(["hidden_size", "num_layers", "tau", "method", "split", "lr",
                            "tensor_model_parallel_size", "data_path", "zero", "nope"]),
       value=_VALUES)
def test_random_configs_fail_cleanly_or_load(section, key, value):
    """Anything either loads (and round-trips) or raises ConfigError: never another exception."""
    try:
        cfg = config_from_dict({section: {key: value}})
    except ConfigError as e:
        assert str(e)
    else:
        assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
