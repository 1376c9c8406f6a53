import os
from pathlib import Path

# The suite never touches the network: hub look-ups and wandb stay off.
for variable, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}.items():
    os.environ.setdefault(variable, value)

import pytest
import torch

from recurrent_lm import RecurrentConfig, RecurrentLM

FIXTURES = Path(__file__).parent / "fixtures"
HUGINN_TINY = FIXTURES / "huginn-tiny"


def weights_in_memory(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors read into memory, for a test that then rewrites the file in place.

    safetensors' load_file maps the file (older releases lazily): writing the same path while its tensors live
    would truncate the mapping under them, and reading one is then a SIGBUS that kills the whole test run."""
    from safetensors.torch import load

    return load(path.read_bytes())


@pytest.fixture
def tiny_config() -> RecurrentConfig:
    return RecurrentConfig.preset("debug")


@pytest.fixture
def tiny_model(tiny_config) -> RecurrentLM:
    torch.manual_seed(0)
    return RecurrentLM(tiny_config).eval()


@pytest.fixture(scope="session")
def huginn_dir(tmp_path_factory) -> Path:
    """The huginn-tiny fixture converted once per test session."""
    from recurrent_lm.huginn import convert_huginn_checkpoint

    return convert_huginn_checkpoint(HUGINN_TINY, tmp_path_factory.mktemp("converted") / "huginn-tiny")


@pytest.fixture(scope="session")
def huginn_cases() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(HUGINN_TINY / "cases.safetensors")
