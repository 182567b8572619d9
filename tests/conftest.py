import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def installed(*modules: str) -> bool:
    """True when every module can be imported (optional backends: faiss, pymilvus, milvus_lite)."""
    return all(importlib.util.find_spec(m) is not None for m in modules)


def shared_dir() -> Path:
    return Path(os.environ.get("IMRET_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    d = shared_dir()
    if not (d / "data").is_dir():
        pytest.skip(f"shared data not found at {d} (set IMRET_SHARED)")
    return d


@pytest.fixture(scope="session")
def mobilenet_weights(shared) -> Path:
    p = shared / "weights" / "mobilenetv2_100.coral_in1k.safetensors"
    if not p.is_file():
        pytest.skip(f"shared MobileNetV2 weights not found at {p}")
    return p


@pytest.fixture(scope="session")
def paris_mini(shared) -> Path:
    d = shared / "data" / "rparis6k-mini"
    if not (d / "gnd_rparis6k-mini.pkl").is_file():
        pytest.skip(f"rparis6k-mini not found at {d}")
    return d


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module: the test machine is small and shared, and several
    torch threads per test oversubscribe it badly. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
