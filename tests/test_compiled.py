"""The compiled extraction path (imret.compiled): when it is chosen, that it falls back to eager
mode with the reason, that a change of the weights never reuses a frozen graph, and (slow) that
its descriptors match eager fp32 over several image sizes and scales without a recompilation."""

import math
import warnings

import numpy as np
import pytest
import torch

import imret.compiled as compiled
from imret.cli import build_parser
from imret.compiled import AUTO_MIN_IMAGES, check_compile, compile_decision, compiled_forward, is_cached, resolve_auto
from imret.extract import extract
from imret.model import create_model
from imret.synthetic import make_object, random_view

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Five JPEGs of four sizes (the last size appears only once, at the end)."""
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    paths = []
    for i, s in enumerate([(160, 120), (120, 160), (200, 100), (160, 120), (136, 104)]):
        p = d / f"img{i}.jpg"
        random_view(make_object(rng, 256), rng, s).save(p, quality=92)
        paths.append(str(p))
    return paths


@pytest.fixture()
def tiny():
    # a plain ResNet: no ceil-mode pooling, whose size guards would recompile the graph per size class
    torch.manual_seed(0)
    return create_model("resnet18", "gem", pretrained=False)


def test_modes_are_checked_with_the_choices(tiny, photos):
    assert check_compile("on") == "on"
    with pytest.raises(ValueError, match="unknown compile mode 'yes'; available: auto, on, off"):
        check_compile("yes")
    with pytest.raises(ValueError, match="available: auto, on, off"):
        extract(tiny, photos[:1], compile="true")


def test_decision():
    big, small = AUTO_MIN_IMAGES, AUTO_MIN_IMAGES - 1
    assert compile_decision("off", device=CPU, n_images=10**6) == (False, "compile off")
    assert compile_decision("on", device=CPU, n_images=1)[0]
    use, why = compile_decision("auto", device=CPU, n_images=big)
    assert use is None and "timing" in why  # decided on the eager rate of the first images
    use, why = compile_decision("auto", device=CPU, n_images=small)
    assert not use and str(AUTO_MIN_IMAGES) in why
    assert compile_decision("auto", device=CPU, n_images=1, cached=True)[0]  # the cost is already paid
    assert not compile_decision("auto", device=torch.device("cuda"), n_images=big)[0]  # automatic on the CPU only
    for mode in ("on", "auto"):  # ReLU-shift hooks: never compiled, whatever the mode
        use, why = compile_decision(mode, device=CPU, n_images=big, hooks=True)
        assert not use and "ReLU-shift" in why
    use, why = compile_decision("auto", device=CPU, n_images=big, refined=True)
    assert not use and "refinement" in why
    assert compile_decision("on", device=CPU, n_images=1, refined=True)[0]
    assert resolve_auto("auto", device="cpu", n_images=big) == "auto"
    assert resolve_auto("auto", device="cpu", n_images=small) == "off"
    assert resolve_auto("off", device="cpu", n_images=big) == "off"
    assert resolve_auto("auto", device="cpu", n_images=big, refined=True) == "off"


def test_auto_without_a_compiler_stays_eager(monkeypatch):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    use, why = compile_decision("auto", device=CPU, n_images=10**6)
    assert not use and "C++ compiler" in why


def test_cli_flag():
    p = build_parser()
    assert p.parse_args(["extract", "x.jpg", "--out", "o"]).compile == "auto"
    assert p.parse_args(["extract", "x.jpg", "--out", "o", "--no-compile"]).compile == "off"
    assert p.parse_args(["extract", "x.jpg", "--out", "o", "--compile", "on"]).compile == "on"
    assert p.parse_args(["index", "add", "store", "x.jpg", "--no-compile"]).compile == "off"
    with pytest.raises(SystemExit):
        p.parse_args(["extract", "x.jpg", "--out", "o", "--compile", "maybe"])


def test_changed_weights_never_reuse_a_frozen_graph(tiny):
    first = compiled_forward(tiny, device=CPU, amp_dtype=None, channels_last=True)
    assert compiled_forward(tiny, device=CPU, amp_dtype=None, channels_last=True) is first
    assert compiled_forward(tiny, device=CPU, amp_dtype=torch.bfloat16, channels_last=True) is not first
    with torch.no_grad():  # what an optimizer step does: an in-place update
        next(tiny.parameters()).add_(1e-3)
    second = compiled_forward(tiny, device=CPU, amp_dtype=None, channels_last=True)
    assert second is not first
    assert first not in compiled._CACHE[tiny].values()  # the stale graph is dropped
    tiny.load_state_dict({k: v.clone() for k, v in tiny.state_dict().items()})
    assert compiled_forward(tiny, device=CPU, amp_dtype=None, channels_last=True) is not second


def test_every_graph_has_its_own_code():
    """dynamo keeps graphs per code object: two closures of one function must not share them."""
    scale = 2.0

    def f(x):
        return x * scale

    g, h = compiled._own_code(f), compiled._own_code(f)
    assert g.__code__ is not f.__code__ and g.__code__ is not h.__code__ and g.__code__ != h.__code__
    assert g(torch.ones(2)).tolist() == [2.0, 2.0]
    scale = 3.0  # the closure is shared, as it should be
    assert h(torch.ones(1)).tolist() == [3.0]


def test_failed_compilation_warns_and_falls_back_to_eager(tiny, photos, monkeypatch):
    def broken_compile(fn, **kw):
        def graph(x):
            raise RuntimeError("CppCompileError: no compiler here\nmore lines")
        return graph

    monkeypatch.setattr(compiled.torch, "compile", broken_compile)
    ref = extract(tiny, photos, compile="off", workers=0)
    assert not ref.compiled and ref.compile_note == "compile off"
    with pytest.warns(UserWarning, match=r"torch.compile failed \(RuntimeError: CppCompileError: no compiler here\)"):
        res = extract(tiny, photos, compile="on", workers=0)
    assert not res.compiled
    assert res.compile_note.startswith("eager: compilation failed (RuntimeError")
    np.testing.assert_array_equal(res.descriptors, ref.descriptors)
    with warnings.catch_warnings():  # the failure is remembered: no second attempt, no second warning
        warnings.simplefilter("error")
        again = extract(tiny, photos, compile="on", workers=0)
    np.testing.assert_array_equal(again.descriptors, ref.descriptors)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["stats"].values()) if "stats" in counters else 0


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_matches_eager_over_sizes_and_scales(tiny, photos, precision):
    if precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no native bf16 on this CPU")
    from torch._dynamo.utils import counters

    scales = (1.0, 2 ** -0.5, 0.5)
    ref = extract(tiny, photos, scales=scales, compile="off", workers=0).descriptors  # eager fp32
    res = extract(tiny, photos[:4], scales=scales, compile="on", precision=precision, workers=0)
    assert res.compiled, res.compile_note
    assert is_cached(tiny, CPU, torch.bfloat16 if precision == "bf16" else None, True)
    frames = counters["stats"]["unique_graphs"]
    # a size and scales not seen yet run through the same graph, without recompiling
    last = extract(tiny, photos[4:], scales=scales, compile="auto", precision=precision, workers=0)
    assert last.compiled and "cached" in last.compile_note
    assert counters["stats"]["unique_graphs"] == frames
    got = np.concatenate([res.descriptors, last.descriptors])
    cos = (got * ref).sum(1)
    bar = 0.9999 if precision == "fp32" else 0.999
    assert cos.min() >= bar, cos
    if precision == "fp32":
        np.testing.assert_allclose(got, ref, atol=1e-4)
    else:  # bf16 really ran (not a graph of the fp32 run): its rounding shows
        assert np.abs(got - ref).max() > 1e-4
    assert math.isclose(float(np.linalg.norm(got[0])), 1.0, rel_tol=1e-5)


def test_freezing_is_on_inside_each_call_only():
    """Two threads inside graph calls at overlapping times each run with freezing on, until they
    leave; a thread outside a call (here the main one) never sees it, and nothing is left set."""
    import threading

    import torch._inductor.config as inductor_config

    before = inductor_config.freezing
    inside, release = threading.Barrier(3), threading.Event()
    seen = {}

    def call(name: str):
        with compiled._freezing():
            inside.wait(timeout=10)
            release.wait(timeout=10)
            seen[name] = inductor_config.freezing
        seen[name + " after"] = inductor_config.freezing

    t = [threading.Thread(target=call, args=(n,)) for n in ("a", "b")]
    for th in t:
        th.start()
    inside.wait(timeout=10)  # both threads are inside their calls now
    seen["main"] = inductor_config.freezing
    release.set()
    for th in t:
        th.join(timeout=10)
    assert seen == {"a": True, "b": True, "main": before, "a after": before, "b after": before}
    assert inductor_config.freezing == before
    with compiled._freezing():
        assert inductor_config.freezing is True
    assert inductor_config.freezing == before


@pytest.mark.slow
def test_the_graph_is_frozen_its_convolutions_fused(tiny):
    """Freezing really happens: oneDNN runs convolutions fused with their ReLU / add
    (``mkldnn::_convolution_pointwise``), not the plain ``aten::convolution`` of an unfrozen
    graph, whose weights stay inputs (what ``options={"freezing": True}`` alone gave); and the
    process-wide inductor setting is left as it was."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    before = inductor_config.freezing
    fwd = compiled_forward(tiny, device=CPU, amp_dtype=None, channels_last=True, variant="frozen-test")
    x = torch.randn(1, 3, 96, 128).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fwd(x)
        assert fwd.ready and fwd.failure is None, fwd.failure
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = fwd(x)
        ref = tiny(x)
    ops = {e.key for e in prof.key_averages()}
    assert "mkldnn::_convolution_pointwise" in ops, sorted(o for o in ops if "conv" in o)
    assert "aten::convolution" not in ops
    assert inductor_config.freezing == before
    torch.testing.assert_close(got, ref.float(), atol=1e-4, rtol=1e-4)


def test_auto_times_the_first_images_then_decides(tiny, photos, monkeypatch):
    """"auto" on a long run: the first AUTO_TIMED_IMAGES images eagerly, timed; then compiled when
    the images left would take AUTO_MIN_EAGER_SECONDS eagerly, else eager to the end. Compilation
    is replaced by a recording stand-in (the real one is checked by the slow tests)."""
    import importlib

    ex = importlib.import_module("imret.extract")  # the module (imret.extract is also the function)

    calls = []

    def fake_compiled(model, **kw):
        def forward(x):
            calls.append(x.shape[0])
            return model(x).float()
        forward.failure = None
        return forward

    monkeypatch.setattr(ex, "compiled_forward", fake_compiled)
    monkeypatch.setattr(compiled, "AUTO_MIN_IMAGES", 3)
    ref = extract(tiny, photos, compile="off", workers=0)
    assert compile_decision("auto", device=CPU, n_images=len(photos))[0] is None
    # eager work left is long (the bar set to 0 s): compiled after the 4 timed images
    monkeypatch.setattr(compiled, "AUTO_MIN_EAGER_SECONDS", 0.0)
    res = extract(tiny, photos, compile="auto", workers=0, batch_size=1)
    assert res.compile_note.startswith("auto: compiled after 4 eager images") and res.compiled
    assert sum(calls) == len(photos) - ex.AUTO_TIMED_IMAGES == 1
    np.testing.assert_allclose(res.descriptors, ref.descriptors, atol=1e-6)
    # short: eager to the end, and the note says why
    calls.clear()
    monkeypatch.setattr(compiled, "AUTO_MIN_EAGER_SECONDS", 1e9)
    res = extract(tiny, photos, compile="auto", workers=0, batch_size=1)
    assert not res.compiled and calls == [] and "compiling pays from" in res.compile_note
    # a store's batch of a long run: the horizon counts the images still to come
    assert compiled.compile_pays(10, 1e8) and not compiled.compile_pays(10, 0.99e8)  # 1e9 s: the bar patched above


# -- fixed-shape graphs for recurring shapes ------------------------------------------------------

def _recording_forward(failing_fixed: bool = False):
    calls = []

    def graph(kind: str):
        def run(x):
            if kind == "fixed" and failing_fixed:
                raise RuntimeError("no fixed graph today")
            calls.append((kind, x.shape[-1]))
            return torch.full((1, 2), float(len(calls)))
        return run

    fwd = compiled.CompiledForward(eager=lambda x: torch.zeros(1, 2), graph=graph("dynamic"), fixed_graph=graph("fixed"))
    return fwd, calls


def test_a_recurring_shape_gets_a_fixed_graph(monkeypatch):
    """The FIXED_AFTER-th call of a shape and every later one go to the fixed-shape graph; other
    shapes stay on the dynamic one; at most MAX_FIXED shapes get one."""
    monkeypatch.setattr(compiled, "FIXED_AFTER", 3)
    monkeypatch.setattr(compiled, "MAX_FIXED", 2)
    fwd, calls = _recording_forward()
    shapes = [torch.zeros(1, 3, 8, w) for w in (10, 11, 12)]
    fwd(shapes[0])  # compiles the dynamic graph (and counts)
    for x in shapes[:2] * 3 + [shapes[2]] * 4:
        fwd(x)
    assert fwd.fixed == {(1, 3, 8, 10), (1, 3, 8, 11)}
    assert [k for k, w in calls if w == 10] == ["dynamic"] * 2 + ["fixed"] * 2
    assert [k for k, w in calls if w == 11] == ["dynamic"] * 2 + ["fixed"] * 1
    assert [k for k, w in calls if w == 12] == ["dynamic"] * 4  # over MAX_FIXED: the dynamic graph


def test_a_failing_fixed_graph_leaves_the_dynamic_one_serving(monkeypatch):
    monkeypatch.setattr(compiled, "FIXED_AFTER", 2)
    fwd, calls = _recording_forward(failing_fixed=True)
    x = torch.zeros(1, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"a fixed-shape graph failed \(RuntimeError: no fixed graph today\)"):
        outs = [fwd(x) for _ in range(4)]
    assert [k for k, _ in calls] == ["dynamic"] * 4 and all(o.sum() > 0 for o in outs)  # never eager's zeros
    assert fwd.fixed_graph is None and fwd.failure is None and fwd.fixed == set()


@pytest.mark.slow
def test_fixed_shape_graphs_match_eager(tiny, photos, monkeypatch):
    """With FIXED_AFTER lowered, the recurring photo size gets fixed-shape graphs at every scale,
    and the descriptors stay those of eager fp32."""
    monkeypatch.setattr(compiled, "FIXED_AFTER", 2)
    scales = (1.0, 0.5)
    ref = extract(tiny, photos, scales=scales, compile="off", workers=0).descriptors
    res = extract(tiny, photos, scales=scales, compile="on", workers=0)
    entry = compiled._CACHE[tiny][compiled._key(tiny, CPU, None, True, None)]
    assert len(entry.fixed) == 2 and entry.fixed_failure is None, entry  # img0 and img3: 160 x 120, two scales
    np.testing.assert_allclose(res.descriptors, ref, atol=1e-4)
