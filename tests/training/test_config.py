import json
import re
from pathlib import Path

import pytest
import yaml

from training.config import TrainConfig, load_config


def test_defaults_are_valid():
    config = TrainConfig()

    assert config.data == "digits"
    assert config.loss == "dcl"
    assert config.scaled_lr == pytest.approx(0.3)


def test_lr_scales_with_batch_size():
    assert TrainConfig(lr=0.4, batch_size=512).scaled_lr == pytest.approx(0.8)
    assert TrainConfig(lr=0.4, batch_size=64).scaled_lr == pytest.approx(0.1)


@pytest.mark.parametrize(
    "image_size, cifar_stem, expected",
    [(32, None, True), (64, None, True), (96, None, False), (224, True, True)],
)
def test_cifar_stem_follows_image_size(image_size, cifar_stem, expected):
    config = TrainConfig(image_size=image_size, cifar_stem=cifar_stem)

    assert config.use_cifar_stem is expected


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"temperature": 0}, "temperature"),
        ({"sigma": -1}, "sigma"),
        ({"batch_size": 1}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"loss": "ntxent"}, "loss"),
        ({"arch": "vit"}, "arch"),
        ({"device": "tpu"}, "device"),
        ({"max_minutes": 0}, "max_minutes"),
        ({"momentum": 1.0}, "momentum"),
        ({"learning_rate": 0.1}, "learning_rate"),
        ({"epochs": 5, "warmup_epochs": 5}, "warmup_epochs"),
    ],
)
def test_invalid_values_raise(overrides, field):
    with pytest.raises(ValueError, match=field):
        load_config(**overrides)


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"loss": "dclw", "epochs": 50, "batch_size": 128}))

    config = load_config(path, epochs=20, seed=None)

    assert config.loss == "dclw"
    assert config.epochs == 20
    assert config.batch_size == 128
    assert config.seed == 0


def test_unknown_key_in_file_names_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 10\ntemprature: 0.2\n")

    with pytest.raises(ValueError, match=re.escape(str(path)) + "(.|\n)*temprature"):
        load_config(path)


def test_non_mapping_file_raises(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("- 1\n- 2\n")

    with pytest.raises(ValueError, match="mapping"):
        load_config(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("name", ["config.yaml", "config.json"])
def test_saved_config_round_trips(tmp_path, name):
    config = TrainConfig(loss="infonce", out_dir=tmp_path / "run", max_minutes=2.5)

    path = config.save(tmp_path / name)

    assert load_config(path) == config
    if name.endswith(".json"):
        assert json.loads(path.read_text())["loss"] == "infonce"


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).parents[2] / "training" / "configs").glob("*.yaml")),
    ids=lambda path: path.name,
)
def test_shipped_configs_are_valid(path):
    config = load_config(path)

    assert config.epochs >= 1


@pytest.mark.parametrize(
    "text, field, message",
    [
        ("epochs: ten\n", "epochs", "valid integer"),
        ("temperature: [0.1]\n", "temperature", "valid number"),
        ("cifar_stem: maybe\n", "cifar_stem", "valid boolean"),
        ("eval_data: 3\n", "eval_data", "valid string"),
    ],
)
def test_wrong_type_in_file_names_key_and_value(tmp_path, text, field, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)

    with pytest.raises(ValueError, match=f"{field}: .*{message}") as caught:
        load_config(path)
    assert "got" in str(caught.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image_size": 4}, "image_size: Input should be greater than or equal to 8"),
        ({"knn_k": 0}, "knn_k: Input should be greater than or equal to 1"),
        ({"log_every_steps": 0}, "log_every_steps: Input should be greater"),
        ({"warmup_epochs": -1}, "warmup_epochs: Input should be greater"),
    ],
)
def test_impossible_value_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(**overrides)


def test_unknown_key_suggests_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("temprature: 0.2\n")

    with pytest.raises(ValueError, match="temprature: unknown key; did you mean temp"):
        load_config(path)


def test_imagenet_config_settings():
    path = Path(__file__).parents[2] / "training" / "configs"
    config = load_config(path / "imagenet-resnet50-dcl.yaml")

    assert config.arch == "resnet50"
    assert config.image_size == 224
    assert not config.use_cifar_stem
    assert config.loss == "dcl"
