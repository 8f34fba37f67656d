import pytest

from training.config import TrainConfig
from training.trainer import TrainResult, train


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """A ResNet-18 run on digits that the time limit stops after its first step."""
    config = TrainConfig(
        data="digits",
        image_size=16,
        batch_size=32,
        epochs=3,
        warmup_epochs=0,
        max_minutes=0.001,
        num_workers=0,
        proj_hidden_dim=64,
        device="cpu",
        out_dir=tmp_path_factory.mktemp("digits-run"),
    )
    return train(config)
