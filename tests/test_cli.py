"""The CLI end to end, in-process, on generated images."""

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imret import cli
from imret.cli import EXIT_BROKEN_PIPE, _scales, main
from imret.extract import load_extraction
from imret.synthetic import make_labelled_folder, make_revisitop

MODEL = ["--model", "resnet18", "--no-pretrained", "--image-size", "128", "--no-progress", "--workers", "2"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return make_labelled_folder(tmp_path_factory.mktemp("lab"), n_classes=4, per_class=4, size=(160, 120))


@pytest.fixture(scope="module")
def revisitop(tmp_path_factory):
    return make_revisitop(tmp_path_factory.mktemp("rv"), n_objects=3, db_per_object=4, n_distractors=3, size=(160, 120))


def test_extract_folder_with_bad_file(labelled, tmp_path, capsys):
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    rc = main(["extract", str(labelled), str(bad), "--out", str(tmp_path / "feats.npy"), *MODEL, "--scales", "1,1/sqrt2"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "skipped 1 image(s)" in err and "broken.jpg" in err
    d = np.load(tmp_path / "feats.npy")
    paths = (tmp_path / "feats.paths.txt").read_text().splitlines()
    assert d.shape == (16, 512) and len(paths) == 16 and d.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1, rtol=1e-5)
    meta = json.loads((tmp_path / "feats.json").read_text())
    assert meta["scales"] == pytest.approx([1, 2**-0.5]) and meta["skipped"][0]["path"].endswith("broken.jpg")


def test_extract_list_file(labelled, tmp_path):
    files = sorted(str(p) for p in labelled.rglob("*.jpg"))[:3]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(files) + "\n")
    assert main(["extract", "--list", str(lst), "--out", str(tmp_path / "f"), *MODEL]) == 0
    assert (tmp_path / "f.paths.txt").read_text().splitlines() == files


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
def test_extract_decode_device_on_cpu(labelled, tmp_path):
    """--decode device (torchvision's decoder; the GPU path's code on the CPU) gives the rows of
    --decode cpu within the resize filters' difference."""
    files = sorted(str(p) for p in labelled.rglob("*.jpg"))[:3]
    for how in ("cpu", "device"):
        assert main(["extract", *files, "--out", str(tmp_path / how), *MODEL, "--decode", how]) == 0
    a, pa, _ = load_extraction(tmp_path / "cpu")
    b, pb, _ = load_extraction(tmp_path / "device")
    assert pa == pb == files
    assert (a * b).sum(1).min() > 0.999


def test_eval_revisitop_writes_table_json_and_plots(revisitop, tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["eval", str(revisitop.parent), "--out", str(out), *MODEL]) == 0
    text = capsys.readouterr().out
    assert "Easy" in text and "Medium" in text and "Hard" in text and "mAP (random)" in text
    res = json.loads((out / "results.json").read_text())
    assert set(res["result"]) >= {"easy", "medium", "hard"}
    assert 0 <= res["result"]["medium"]["map"] <= 1
    for png in ("ap_per_query.png", "topk.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 100 and im.size[1] > 50


def test_eval_labelled_folder_and_csv(labelled, tmp_path, capsys):
    assert main(["eval", str(labelled), "--out", str(tmp_path / "a"), *MODEL]) == 0
    res = json.loads((tmp_path / "a" / "results.json").read_text())["result"]
    assert 0 < res["map"] <= 1
    csv = tmp_path / "set.csv"
    rows = ["path,label"] + [f"{p},{p.parent.name}" for p in sorted(labelled.rglob("*.jpg"))]
    csv.write_text("\n".join(rows) + "\n")
    assert main(["eval", str(csv), "--out", str(tmp_path / "b"), *MODEL, "--no-plots"]) == 0
    res2 = json.loads((tmp_path / "b" / "results.json").read_text())["result"]
    assert res2["map"] == pytest.approx(res["map"], abs=1e-6)  # same images, same labels


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing"), *MODEL]) == 1
    assert "neither a gnd_*.pkl" in capsys.readouterr().err
    assert main(["extract", str(tmp_path), "--out", str(tmp_path / "x.npy"), *MODEL]) == 1
    assert "no images found" in capsys.readouterr().err
    assert main(["extract", "a.jpg", "--out", "x.npy", "--model", "resnet51", "--no-pretrained"]) == 1
    assert "unknown backbone 'resnet51'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["extract", "a.jpg", "--out", "x.npy", "--scales", "1,abc"])


def test_scale_parser():
    assert _scales("1,1/sqrt2,1/2") == pytest.approx((1, 2**-0.5, 0.5))
    assert _scales("0.5") == (0.5,)


def test_models_listing(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "mobilenetv2_100.coral" in out and "rgem" in out and "heads (--head):" in out and "dolg " in out


def test_extract_name_with_newline_keeps_rows_and_paths_aligned(labelled, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    files = sorted(labelled.rglob("*.jpg"))[:3]
    names = ["a\nb.jpg", "plain.jpg", "c\x1b[31m.jpg"]
    for f, name in zip(files, names):
        (src / name).write_bytes(f.read_bytes())
    out = tmp_path / "out" / "f.npy"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f.paths.txt").write_text("stale\n")  # from an earlier run
    assert main(["extract", str(src), "--out", str(out), *MODEL]) == 0
    printed = capsys.readouterr().out
    assert "f.paths.txt not written" in printed
    d = np.load(out)
    lines = (tmp_path / "out" / "f.paths.jsonl").read_text().splitlines()
    assert d.shape[0] == len(lines) == 3  # the old .paths.txt had 4 lines for these 3 rows
    assert not (tmp_path / "out" / "f.paths.txt").exists()
    want = sorted(str(src / n) for n in names)
    assert [json.loads(line) for line in lines] == want
    meta = json.loads((tmp_path / "out" / "f.json").read_text())
    assert meta["paths"] == "f.paths.jsonl" and meta["paths_txt"] is None and meta["n"] == 3
    rows, paths, _ = load_extraction(out)
    assert paths == want
    # round trip: the .paths.jsonl is a valid --list, and gives the same rows
    again = tmp_path / "again.npy"
    assert main(["extract", "--list", str(tmp_path / "out" / "f.paths.jsonl"), "--out", str(again), *MODEL]) == 0
    rows2, paths2, _ = load_extraction(again)
    assert paths2 == want
    np.testing.assert_allclose(rows2, rows, atol=1e-6)


def test_extract_plain_names_write_jsonl_and_txt_alike(labelled, tmp_path):
    files = sorted(str(p) for p in labelled.rglob("*.jpg"))[:2]
    lst = tmp_path / "list.txt"
    lst.write_bytes(("\r\n".join(files) + "\r\n").encode())  # a list written on Windows
    assert main(["extract", "--list", str(lst), "--out", str(tmp_path / "f"), *MODEL]) == 0
    txt = (tmp_path / "f.paths.txt").read_text().splitlines()
    jsonl = [json.loads(line) for line in (tmp_path / "f.paths.jsonl").read_text().splitlines()]
    assert txt == jsonl == files
    meta = json.loads((tmp_path / "f.json").read_text())
    assert meta["paths_txt"] == "f.paths.txt" and "paths_txt_omitted" not in meta


def _imret(args, env_extra=None, **kw):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "imret.cli", *args], env=env, timeout=300, **kw)


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_reader_closing_the_pipe_early_is_not_an_error_trace(unbuffered):
    # `imret models | head -1` with the reader already gone: no traceback, exit 128 + SIGPIPE
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        p = _imret(["models"], {"PYTHONUNBUFFERED": "1"} if unbuffered else None,
                   stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr
    assert p.stderr == ""
    assert p.returncode == EXIT_BROKEN_PIPE == 141


def test_reader_taking_the_first_line_gets_it():
    p = subprocess.run(f"{sys.executable} -m imret.cli models | head -1", shell=True, capture_output=True,
                       text=True, timeout=300)
    assert p.stdout.startswith("backbone presets") and p.stdout.count("\n") == 1
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (writes fail with ENOSPC)")
def test_full_disk_is_one_error_line():
    with open("/dev/full", "w") as full:
        p = _imret(["models"], stdout=full, stderr=subprocess.PIPE, text=True)
    assert p.stderr == "imret: error: No space left on device\n"
    assert p.returncode == 1


def test_os_errors_name_the_file(monkeypatch, capsys):
    def refuse(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/out/feats.npy")

    monkeypatch.setattr(cli, "cmd_models", refuse)
    assert main(["models"]) == 1
    assert capsys.readouterr().err == f"imret: error: {os.strerror(errno.EACCES)}: /data/out/feats.npy\n"

    def no_space(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/x\n.npy")

    monkeypatch.setattr(cli, "cmd_models", no_space)
    assert main(["models"]) == 1
    assert capsys.readouterr().err == f'imret: error: {os.strerror(errno.ENOSPC)}: "/data/x\\n.npy"\n'


def test_unwritable_output_is_one_error_line(labelled, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    f = str(sorted(labelled.rglob("*.jpg"))[0])
    assert main(["extract", f, "--out", str(blocker / "sub" / "x.npy"), *MODEL]) == 1
    err = capsys.readouterr().err
    assert err.startswith("imret: error: ") and str(blocker) in err and "Traceback" not in err
