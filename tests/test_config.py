"""ModelConfig: presets, validation, and config.json round trips with transformers."""

import json
import os

import pytest
import transformers

from codegemma.config import ConfigError, ModelConfig


def test_presets_are_the_published_architectures():
    two, seven = ModelConfig.preset("2b"), ModelConfig.preset("7b")
    assert (two.hidden_size, two.intermediate_size, two.num_hidden_layers) == (2048, 16384, 18)
    assert (two.num_attention_heads, two.num_key_value_heads, two.head_dim) == (8, 1, 256)
    assert two.attention_kind == "MQA" and seven.attention_kind == "MHA"
    assert (seven.hidden_size, seven.intermediate_size, seven.num_hidden_layers) == (
        3072,
        24576,
        28,
    )
    assert two.vocab_size == seven.vocab_size == 256000 and two.rope_theta == 10000.0


def test_round_trip_through_transformers(tmp_path):
    cfg = ModelConfig.preset("tiny").replace(rope_theta=500000.0, tie_word_embeddings=False)
    cfg.save(tmp_path)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "gemma" and hf.num_key_value_heads == cfg.num_key_value_heads
    hf.save_pretrained(tmp_path / "hf")  # transformers 5 nests rope_theta in rope_parameters
    assert ModelConfig.load(tmp_path / "hf") == cfg


def test_saved_config_has_normal_permissions(tmp_path):
    path = ModelConfig.preset("tiny").save(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(num_attention_heads=3), "multiple of"),
        (dict(head_dim=15), "even"),
        (dict(hidden_size=0), "positive integer"),
        (dict(hidden_activation="relu"), "not Gemma's"),
        (dict(bos_token_id=10**6), "outside the vocabulary"),
    ],
)
def test_invalid_configs_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.preset("tiny", **change)


def test_unknown_model_type_and_missing_fields(tmp_path):
    with pytest.raises(ConfigError, match="'llama' is not supported"):
        ModelConfig.from_hf_dict({"model_type": "llama"})
    with pytest.raises(ConfigError, match="lacks required field"):
        ModelConfig.from_hf_dict(
            {"model_type": "gemma", "hidden_size": 8, "num_attention_heads": 2}
        )
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.load(tmp_path / "nowhere")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("13b")


def test_hf_dict_is_json():
    assert json.loads(json.dumps(ModelConfig.preset("2b").to_hf_dict()))["architectures"] == [
        "GemmaForCausalLM"
    ]


@pytest.mark.parametrize(
    "fields",
    [
        {"model_type": "gemma"},
        {"model_type": "gemma", "hidden_size": "2048", "num_attention_heads": 8},
        {"model_type": "gemma", "hidden_size": 64, "num_attention_heads": 0},
    ],
    ids=["only model_type", "string hidden_size", "zero heads"],
)
def test_incomplete_or_mistyped_config_is_a_config_error(fields):
    base = ModelConfig.preset("tiny").to_hf_dict()
    data = {k: v for k, v in base.items() if k not in ("head_dim",)}
    data = fields if len(fields) == 1 else {**data, **fields}
    with pytest.raises(ConfigError):
        ModelConfig.from_hf_dict(data)
