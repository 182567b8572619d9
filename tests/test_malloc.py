"""imret.malloc: glibc allocator settings, checked in fresh processes (they are process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from imret import malloc

GLIBC = malloc.glibc_version() is not None
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the C library is not glibc (mallopt settings do not apply)")

# A fresh process runs cycles that malloc six 16 MiB blocks, touch them and free them all (the
# pattern of a forward pass: several feature maps alive, then all freed), and counts the minor
# page faults of three cycles after two warm-up ones. With glibc's defaults the 96 MiB freed at
# the top of the heap exceed its (self-raised, <= 64 MiB) trim threshold and go back to the
# system, so every cycle faults its pages in again; after tune_malloc the memory is kept.
_PROBE = textwrap.dedent("""
    import ctypes, json, resource, sys
    sys.path.insert(0, {src!r})
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    tuned = None
    if sys.argv[1] == "tune":
        from imret.malloc import tune_malloc
        r = tune_malloc()
        tuned = {{"applied": r.applied, "left": r.left}}
    size, blocks = 16 << 20, 6

    def cycle():
        ptrs = [libc.malloc(size) for _ in range(blocks)]
        for p in ptrs:
            ctypes.memset(p, 1, size)
        for p in ptrs:
            libc.free(p)

    cycle(); cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        cycle()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({{"faults": faults, "pages": 3 * blocks * size // resource.getpagesize(), "tuned": tuned}}))
""")


def _probe(mode: str, env: dict | None = None) -> dict:
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    full_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", _PROBE.format(src=src), mode], capture_output=True, text=True,
                         env=full_env, timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@needs_glibc
def test_default_glibc_faults_every_cycle_and_tuned_keeps_the_memory():
    default = _probe("plain")
    tuned = _probe("tune")
    assert tuned["tuned"]["applied"] == {"mmap_threshold": malloc.DEFAULT_MMAP_THRESHOLD,
                                         "trim_threshold": malloc.DEFAULT_TRIM_THRESHOLD,
                                         "top_pad": malloc.DEFAULT_TOP_PAD}
    assert tuned["faults"] < 0.01 * tuned["pages"], tuned
    if not _thp_always():  # with huge pages everywhere, a fault brings 2 MiB: too few to compare
        assert default["faults"] > 0.5 * default["pages"], default  # the reference: glibc's own behaviour


@needs_glibc
def test_the_users_environment_setting_wins():
    got = _probe("tune", {"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert "mmap_threshold" not in got["tuned"]["applied"]
    assert got["tuned"]["left"] == {"mmap_threshold": "from MALLOC_MMAP_THRESHOLD_"}
    if not _thp_always():  # the user's fixed 128 KiB threshold: every block is a fresh mapping
        assert got["faults"] > 0.5 * got["pages"], got


@pytest.mark.parametrize(
    "kw, message",
    [({"mmap_threshold": (32 << 20) + 1}, "mmap_threshold must be in 0..33554432"),
     ({"trim_threshold": -1}, "trim_threshold must be in 0.."),
     ({"top_pad": 2**31}, "top_pad must be in 0..")],
)
def test_out_of_range_values_are_refused_naming_the_range(kw, message):
    with pytest.raises(ValueError, match=message):
        malloc.tune_malloc(**kw)


def test_non_integer_values_are_refused():
    with pytest.raises(TypeError, match="mmap_threshold must be an int"):
        malloc.tune_malloc(mmap_threshold=1.5)
    with pytest.raises(TypeError, match="top_pad must be an int"):
        malloc.tune_malloc(top_pad=True)


def test_without_glibc_nothing_is_done_and_the_reason_is_given(monkeypatch):
    monkeypatch.setattr(malloc, "_libc", lambda: None)
    r = malloc.tune_malloc()
    assert not r.active and r.applied == {} and "not glibc" in r.reason
    assert r.describe().startswith("default allocator (not glibc")
    assert malloc.malloc_tuning() is r


@needs_glibc
def test_the_cli_tunes_unless_told_not_to():
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {src!r})
        from imret import cli, malloc
        try:
            cli.main(["index", "--help"])
        except SystemExit:
            pass
        r = malloc.malloc_tuning()
        print("TUNED" if r is not None and r.active else "DEFAULT")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "IMRET_MALLOC_TUNING": "0"}, timeout=120)
    assert on.stdout.strip().splitlines()[-1] == "TUNED", on.stderr[-2000:]
    assert off.stdout.strip().splitlines()[-1] == "DEFAULT", off.stderr[-2000:]
