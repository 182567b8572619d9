"""`imret --version` and `--debug` (full tracebacks instead of the one-line error)."""

import pytest

import imret
from imret import cli
from imret.cli import main


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() == f"imret {cli.package_version()}"
    assert cli.package_version() == imret.__version__  # the installed metadata and the package agree


@pytest.mark.parametrize("argv", [["--debug", "eval", "/no/such/set"], ["eval", "/no/such/set", "--debug"]])
def test_debug_prints_the_traceback_then_the_error(argv, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "in _dataset_kind" in err  # where it was raised
    assert err.rstrip().splitlines()[-1].startswith("imret: error: dataset '/no/such/set'")


def test_without_debug_the_error_is_one_line(capsys):
    assert main(["eval", "/no/such/set"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--debug" not in err  # a user's mistake needs no traceback hint


def test_a_foreign_runtime_error_points_at_debug(monkeypatch, capsys):
    """A RuntimeError from a library (torch's, say) is one line that says how to see where it came from."""
    def boom(args):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(cli, "cmd_models", boom)
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("imret: error: CUDA error: device-side assert triggered "
                           "(run with --debug for the full traceback)")
    assert main(["models", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in boom" in err and "run with --debug" not in err


def test_debug_also_shows_os_errors_in_full(tmp_path, capsys):
    missing = tmp_path / "nope.pkl"
    assert main(["--debug", "index", "info", str(missing)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("imret: error:")
