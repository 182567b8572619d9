import importlib.util
import os
import shutil
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def installed(*modules: str) -> bool:
    """True when every module can be imported (optional backends: faiss, pymilvus, milvus_lite)."""
    return all(importlib.util.find_spec(m) is not None for m in modules)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# --- generated photos, the tiny model and built stores, shared by the store and retrieval tests ---


@pytest.fixture(scope="session")
def make_photos(tmp_path_factory):
    """Factory: ``make_photos(n_classes, per_class, size, seed=0)`` -> the sorted paths of
    :func:`imret.synthetic.make_labelled_folder` photos, written once per session for each set
    of arguments (tests read them; none writes into their folder)."""
    from imret.synthetic import make_labelled_folder

    made: dict[tuple, list[str]] = {}

    def make(n_classes: int, per_class: int, size: tuple[int, int], seed: int = 0) -> list[str]:
        key = (n_classes, per_class, tuple(size), seed)
        if key not in made:
            root = make_labelled_folder(tmp_path_factory.mktemp("photos"), n_classes=n_classes,
                                        per_class=per_class, size=tuple(size), seed=seed)
            made[key] = sorted(str(p) for p in root.rglob("*.jpg"))
        return list(made[key])

    return make


@pytest.fixture(scope="session")
def tiny_model():
    """An untrained ResNet-18 + GeM (seed 0, 512-D): weights are never changed by the tests
    that share it (stores save it, extraction only puts it in eval mode)."""
    import torch

    from imret import create_model

    torch.manual_seed(0)
    return create_model("resnet18", "gem", pretrained=False)


@pytest.fixture(scope="session")
def make_store(tmp_path_factory, tiny_model):
    """Factory: ``make_store(photos, preprocessing, commit_every=64)`` -> the directory of a
    closed exact-search store of ``tiny_model`` holding ``photos``, built once per session for
    each set of arguments. Shared: open it read-only, or change a copy (``copy_store``)."""
    from imret.index.store import Store

    made: dict[tuple, Path] = {}

    def make(photos, preprocessing, *, commit_every: int = 64) -> Path:
        key = (tuple(photos), preprocessing, commit_every)
        if key not in made:
            path = tmp_path_factory.mktemp("built") / "store"
            with Store.create(path, tiny_model, preprocessing=preprocessing) as st:
                st.add(photos, commit_every=commit_every, workers=0)
            made[key] = path
        return made[key]

    return make


@pytest.fixture
def copy_store(tmp_path):
    """Factory: ``copy_store(path)`` -> a copy of the store at ``path`` in this test's
    ``tmp_path`` (``tmp_path / "store"``), for a test that changes it."""

    def copy(src: Path) -> Path:
        dst = tmp_path / "store"
        n = 1
        while dst.exists():
            dst, n = tmp_path / f"store-{n}", n + 1
        shutil.copytree(src, dst)
        return dst

    return copy


# --- the small store several test modules search (4 objects x 5 photos, 160 x 120, 96 px) -----


@pytest.fixture(scope="session")
def small_photos(make_photos):
    """20 generated photos: 5 views of each of 4 objects, 160 x 120."""
    return make_photos(n_classes=4, per_class=5, size=(160, 120))


@pytest.fixture(scope="session")
def small_store(make_store, small_photos):
    """A closed exact-search store of ``small_photos`` (96 px, committed 6 at a time), shared:
    open it read-only, or change a copy (``copy_store``)."""
    from imret.index.store import Preprocessing

    return make_store(small_photos, Preprocessing(image_size=96), commit_every=6)


# --- views for the second-stage tests (verification, localisation, re-rankers over a store) ----


@pytest.fixture(scope="session")
def view_photos(make_photos):
    """12 generated photos, 320 x 240: 3 views of each of 4 objects (seed 5). Photos 0-7 are
    the store of ``view_store``; photo 8 is a third view of the object of photos 6 and 7."""
    return make_photos(4, 3, (320, 240), seed=5)


@pytest.fixture(scope="session")
def view_store(make_store, view_photos):
    """A closed store of ``view_photos[:8]`` at 96 px (no local features, no re-rankers);
    shared: read it, or change a copy (``copy_store``)."""
    from imret.index.store import Preprocessing

    return make_store(view_photos[:8], Preprocessing(image_size=96))
