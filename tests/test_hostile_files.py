"""`imret extract` against files that are not what their names say: a FIFO, a link to
/dev/zero, a folder, an empty file, names with line breaks and control characters.

Every run is a subprocess with a timeout: code that opened the FIFO blocking, or read
/dev/zero, would hang, and the timeout turns that into a failure instead of a stuck suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imret import images
from imret.images import ImageError, load_image

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and symbolic links (POSIX)")

MODEL = ["--model", "resnet18", "--no-pretrained", "--image-size", "64", "--no-progress", "--workers", "2"]
TIMEOUT_S = 240  # a cold start imports torch and timm: seconds; a hang would be forever


def _photo(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path, quality=90)


@pytest.fixture
def hostile(tmp_path) -> dict[str, Path]:
    """A folder of two good photos, two good photos with odd names, and five traps."""
    d = tmp_path / "in"
    d.mkdir()
    files = {
        "good1": d / "good1.jpg",
        "good2": d / "good2.jpg",
        "newline": d / "line\nbreak.jpg",  # a valid photo: extracted, its path escaped
        "control": d / "bell\x07\x1b[31mred.jpg",
        "fifo": d / "x.jpg",
        "zero": d / "z.jpg",
        "folder": d / "d.jpg",
        "empty": d / "e.jpg",
        "empty_odd": d / "empty\ttab\r.jpg",
    }
    for i, key in enumerate(("good1", "good2", "newline", "control")):
        _photo(files[key], i)
    os.mkfifo(files["fifo"])
    os.symlink("/dev/zero", files["zero"])
    files["folder"].mkdir()
    files["empty"].write_bytes(b"")
    files["empty_odd"].write_bytes(b"")
    return files


def _extract(args: list[str], out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    try:
        return subprocess.run([sys.executable, "-m", "imret.cli", "extract", *args, "--out", str(out), *MODEL],
                              capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"imret extract hung on a hostile file (killed after {TIMEOUT_S} s): {e.stderr!r}")


def _skipped(out: Path) -> dict[str, str]:
    meta = json.loads(out.with_suffix(".json").read_text())
    return {s["path"]: s["reason"] for s in meta["skipped"]}


def test_extract_folder_with_hostile_files(hostile, tmp_path):
    out = tmp_path / "f.npy"
    p = _extract([str(hostile["good1"].parent)], out)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    rows = np.load(out)
    paths = [json.loads(line) for line in out.with_suffix(".paths.jsonl").read_text().splitlines()]
    want = sorted(str(hostile[k]) for k in ("good1", "good2", "newline", "control"))
    assert paths == want and rows.shape == (4, 512)  # odd names are extracted, rows aligned
    assert not out.with_suffix(".paths.txt").exists()
    skipped = _skipped(out)
    assert skipped == {
        str(hostile["fifo"]): "is a FIFO (named pipe), not a regular file",
        str(hostile["zero"]): "is a device, not a regular file",
        str(hostile["empty"]): "empty file (0 bytes)",
        str(hostile["empty_odd"]): "empty file (0 bytes)",
    }  # the folder d.jpg is a folder: walked into (it is empty), never listed as an image
    # the report on stderr escapes control characters: one line per skipped file
    lines = p.stderr.splitlines()
    assert "skipped 4 image(s):" in lines
    assert f"  {json.dumps(str(hostile['empty_odd']))}: empty file (0 bytes)" in lines
    assert "\x1b" not in p.stdout + p.stderr and "\x07" not in p.stdout + p.stderr


def test_extract_list_of_hostile_files(hostile, tmp_path):
    # a list file cannot hold a name with a line break; everything else can be named
    keys = ("fifo", "zero", "folder", "empty", "good1", "control")
    lst = tmp_path / "list.txt"
    lst.write_text("".join(str(hostile[k]) + "\n" for k in keys), encoding="utf-8")
    out = tmp_path / "g.npy"
    p = _extract(["--list", str(lst)], out)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    paths = [json.loads(line) for line in out.with_suffix(".paths.jsonl").read_text().splitlines()]
    assert paths == [str(hostile["good1"]), str(hostile["control"])]
    assert _skipped(out) == {
        str(hostile["fifo"]): "is a FIFO (named pipe), not a regular file",
        str(hostile["zero"]): "is a device, not a regular file",
        str(hostile["folder"]): "is a directory",
        str(hostile["empty"]): "empty file (0 bytes)",
    }


def test_each_trap_is_refused_by_load_image_with_its_reason(hostile, tmp_path):
    broken = tmp_path / "broken.jpg"
    os.symlink(tmp_path / "gone.jpg", broken)
    cases = {
        hostile["fifo"]: "is a FIFO (named pipe), not a regular file",
        hostile["zero"]: "is a device, not a regular file",
        hostile["folder"]: "is a directory",
        hostile["empty"]: "empty file (0 bytes)",
        broken: "a broken symbolic link",
    }
    for path, reason in cases.items():
        with pytest.raises(ImageError) as info:
            load_image(path)
        assert (info.value.path, info.value.reason) == (str(path), reason)
    assert load_image(hostile["newline"]).size == (64, 48)


def test_a_fifo_swapped_in_after_the_check_does_not_block(hostile, monkeypatch):
    # the race: stat says "regular file", then the name is replaced by a FIFO before it is
    # opened. A blocking open would wait for a writer forever; the non-blocking one returns
    # at once and fstat refuses what it opened.
    fifo = str(hostile["fifo"])
    regular = os.stat(hostile["good1"])
    real_stat = os.stat
    monkeypatch.setattr(images.os, "stat", lambda p, *a, **k: regular if os.fspath(p) == fifo else real_stat(p, *a, **k))
    outcome: list[BaseException | str] = []

    def run() -> None:
        try:
            load_image(fifo)
            outcome.append("loaded")
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # blocked in open(): release it with a writer, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(10)
        pytest.fail("opening a FIFO blocked")
    assert len(outcome) == 1 and isinstance(outcome[0], ImageError), outcome
    assert outcome[0].reason == "is a FIFO (named pipe), not a regular file"
