"""Compiled forward passes for extraction: ``torch.compile`` (inductor) with weight freezing.

:func:`imret.extract.extract` runs the network's per-scale forward pass (trunk, head, the
optional autocast) through :func:`compiled_forward` when its ``compile`` setting says so
(:data:`COMPILE_MODES`):

- ``"off"``: eager PyTorch, as before.
- ``"on"``: compile; when compilation fails, a ``UserWarning`` gives the reason and the run goes
  on in eager mode (the result's ``compile_note`` says so too).
- ``"auto"`` (default): compile only where it is safe and pays (:func:`compile_decision`): on
  the CPU, without ReLU-shift hooks, with a C++ compiler on the path, for runs of at least
  :data:`AUTO_MIN_IMAGES` images, and only once the first :data:`AUTO_TIMED_IMAGES` images,
  described eagerly and timed, predict at least :data:`AUTO_MIN_EAGER_SECONDS` of eager work
  left (:func:`compile_pays`: a ResNet50 at 1024 px compiles, a light network at 512 px over a
  few hundred images does not); or whenever this process already compiled the same network
  with the same weights and precision (the cost is paid).

The graph is compiled once per process for a network, its current weights, the device, the
memory layout and the autocast dtype, with dynamic shapes (``dynamic=True``): one graph serves
every image size and every scale, without padding (which would change GeM descriptors) and
without a recompilation per size. (Networks with ceil-mode pooling, such as timm's ResNet-D
variants with average-pool shortcuts, are the exception: inductor guards on the parity of the
input sizes there, so they compile a few graphs, up to dynamo's limit of 8, then run eager.)
Freezing folds the weights into the graph as constants and fuses each convolution with its
ReLU and residual add (oneDNN's ``_convolution_pointwise``). Inductor pre-packs those weights
into oneDNN's blocked layout only for graphs of fixed input size; in a dynamic-shape graph it
leaves them plain, and oneDNN then reorders every weight on every call (53 reorders, ~8 ms per
call for a ResNet50 on 2 cores, whatever the image size: 16 % of a 384 x 512 pass). So the
frozen graph is compiled with :func:`prepack_conv_weights` as a post-grad pass: it packs each
convolution's weight once, at compile time, for the size of the first input; oneDNN picks the
same weight layout for every input size on the CPUs measured, and where it picks another one it
reorders from the packed layout as it did from the plain one (a correct result either way). A
later change of the weights (an optimizer
step, ``load_state_dict``) changes the key (each tensor's ``_version`` counter), so a stale
graph is never used. Across processes inductor's on-disk caches (FX graph and AOTAutograd
caches, in ``$TORCHINDUCTOR_CACHE_DIR``, by default ``<tmp>/torchinductor_<user>``) make the
second process's compilation much cheaper; dynamo's tracing is still paid once per process.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import shutil
import threading
import time
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["COMPILE_MODES", "AUTO_MIN_IMAGES", "AUTO_TIMED_IMAGES", "AUTO_MIN_EAGER_SECONDS", "compile_pays",
           "check_compile", "compile_decision", "resolve_auto",
           "compiled_forward", "is_cached", "CompiledForward", "inductor_cache_dir", "prepack_conv_weights"]

COMPILE_MODES = ("auto", "on", "off")

AUTO_MIN_IMAGES = 200
"""``compile="auto"`` considers compiling for runs of at least this many images (unless a graph
is already cached in the process); shorter runs (queries, small folders) stay eager."""

AUTO_TIMED_IMAGES = 4
"""``compile="auto"`` describes this many images eagerly, timed, before it decides."""

AUTO_MIN_EAGER_SECONDS = 600.0
"""``compile="auto"`` compiles when the images left would take at least this long eagerly.
Compiling a ResNet50 cost 20-70 s on 2 cores (less with inductor's disk cache warm) and the
frozen graph ran 0-27 % faster per image than eager mode, end to end, depending on the CPU, the
precision and the scales (BENCHMARKS.md, extraction speed): where it gains, it pays after some
5-10 minutes of eager work."""


def compile_pays(remaining_images: int, eager_seconds_per_image: float) -> bool:
    """Whether compiling pays for ``remaining_images`` at the measured eager rate."""
    return remaining_images * eager_seconds_per_image >= AUTO_MIN_EAGER_SECONDS


def check_compile(mode: str) -> str:
    """``mode`` when it is one of :data:`COMPILE_MODES`, else ``ValueError`` naming them."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; available: {', '.join(COMPILE_MODES)}")
    return mode


def inductor_cache_dir() -> str:
    """Where inductor keeps its compiled graphs across processes (``$TORCHINDUCTOR_CACHE_DIR``,
    by default ``<tmp>/torchinductor_<user>``); reading it creates the folder."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def _weights_key(model: torch.nn.Module) -> tuple:
    """Identity and in-place version of every parameter and buffer: changes when any is replaced
    or modified in place (optimizer steps and ``load_state_dict`` bump ``_version``)."""
    out = []
    for t in (*model.parameters(), *model.buffers()):
        out.append((t.data_ptr(), tuple(t.shape), t.dtype, t._version))
    return tuple(out)


@dataclass
class _SizeTrial:
    """Per input shape: how often each graph ran it, one warm timing of each (a call after the
    graph's first at this shape, which builds oneDNN's primitives for it), then the choice."""

    runs: dict[str, int] = field(default_factory=lambda: {"plain": 0, "packed": 0})
    plain: float | None = None
    packed: float | None = None
    choice: str | None = None


@dataclass
class CompiledForward:
    """One network's compiled per-scale forward: ``(B, 3, H, W) -> (B, D)`` float32.

    Calls the compiled graph; the first call compiles it. Should compiling (or running the
    graph) raise, the error is kept in ``failure``, a ``UserWarning`` names it, and this and
    every later call run ``eager`` instead.

    On the CPU it holds a second graph, ``packed``: the same frozen graph with its convolution
    weights pre-packed for the size it was compiled at (:func:`prepack_conv_weights`). Which of
    the two runs is decided per input shape, by timing: a shape's first two inputs go through
    the plain graph, the next two through the packed one, and from then on the faster of the
    two serves that shape, by the second call of each (the first builds oneDNN's primitives for
    the shape; a call that compiled is never timed). Pre-packing
    saves oneDNN's per-call weight reorders (~8 ms per ResNet50 pass on 2 cores), but oneDNN
    picks its weight layout per shape, and where it wants another blocked layout than the packed
    one its blocked-to-blocked reorder is slow (83 ms for one 2048 x 1024 weight measured), so
    neither graph is right for every shape. Shapes seen once or twice run as before; the trial
    costs two calls of the slower graph. ``trials`` keeps the per-shape record.
    """

    eager: Callable[[torch.Tensor], torch.Tensor]
    graph: Callable[[torch.Tensor], torch.Tensor]
    packed: Callable[[torch.Tensor], torch.Tensor] | None = None
    failure: str | None = None
    ready: bool = False  # compiled and run once
    packed_ready: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    packing: "PackReport" = field(default_factory=lambda: PackReport(), repr=False)
    trials: dict[tuple, _SizeTrial] = field(default_factory=dict, repr=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready and self.failure is None:
            with self.lock:  # one thread compiles; the others wait for its graph
                if not self.ready and self.failure is None:
                    y = self._graph_or_none(x)
                    self.ready = y is not None
                    if y is not None:
                        return y
        if self.failure is not None:
            return self.eager(x)
        shape = tuple(x.shape)  # the first call above compiled: it is not counted in any trial
        if self._next(shape) == "packed":
            y = self._packed_or_none(x, shape)
            if y is not None:
                return y
        t0 = time.perf_counter()
        y = self._graph_or_none(x)
        if y is None:
            return self.eager(x)
        self._record(shape, "plain", time.perf_counter() - t0)
        return y

    def choices(self) -> dict[str, int]:
        """How many input shapes each graph serves so far (``"undecided"``: not yet timed on both)."""
        with self.lock:
            out = {"plain": 0, "packed": 0, "undecided": 0}
            for t in self.trials.values():
                out[t.choice or "undecided"] += 1
        return out

    def _next(self, shape: tuple) -> str:
        if self.packed is None:
            return "plain"
        with self.lock:
            trial = self.trials.setdefault(shape, _SizeTrial())
            if trial.choice is not None:
                return trial.choice
            return "plain" if trial.plain is None else "packed"

    def _record(self, shape: tuple, kind: str, seconds: float | None) -> None:
        """Count a call of graph ``kind`` at ``shape``, lasting ``seconds`` (None: it compiled)."""
        if self.packed is None:
            return
        with self.lock:
            trial = self.trials.setdefault(shape, _SizeTrial())
            if trial.choice is not None:
                return
            trial.runs[kind] += 1
            if seconds is not None and trial.runs[kind] >= 2 and getattr(trial, kind) is None:
                setattr(trial, kind, seconds)
            if trial.plain is not None and trial.packed is not None:
                trial.choice = "packed" if trial.packed <= trial.plain else "plain"

    def _packed_or_none(self, x: torch.Tensor, shape: tuple) -> torch.Tensor | None:
        """The packed graph's output (compiling it on the first call, under the lock), timed
        when the call compiled nothing; None when it cannot run (the plain graph serves then)."""
        if not self.packed_ready:
            y = None
            with self.lock:
                if not self.packed_ready and self.packed is not None:
                    y = self._packed_call(x)
                    self.packed_ready = y is not None
            if y is not None:
                self._record(shape, "packed", None)  # a compiling call: not timed
                return y
            if not self.packed_ready:
                return None
        t0 = time.perf_counter()
        y = self._packed_call(x)
        if y is not None:
            self._record(shape, "packed", time.perf_counter() - t0)
        return y

    def _packed_call(self, x: torch.Tensor) -> torch.Tensor | None:
        packed = self.packed
        if packed is None:
            return None
        try:
            with _freezing(prepack=True), _reporting_to(self.packing):
                y = packed(x)
        except Exception as e:  # noqa: BLE001 - the plain graph serves every shape from now on
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.packing.skip(f"packed graph failed: {type(e).__name__}: {first}"[:300])
            self.packed = None
            return None
        if self.packing.packed == 0:  # nothing to pack (no oneDNN convolution): one graph is enough
            self.packed = None
        return y

    def _graph_or_none(self, x: torch.Tensor) -> torch.Tensor | None:
        try:
            with _freezing():
                return self.graph(x)
        except Exception as e:  # noqa: BLE001 - any compiler error: fall back, with the reason
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.failure = f"{type(e).__name__}: {first}"[:300]
            warnings.warn(f"torch.compile failed ({self.failure}); extracting in eager mode", UserWarning, stacklevel=3)
            return None


def _freezing(prepack: bool = False):
    """Inductor's weight freezing, for the calls that may (re)compile a graph (with
    :func:`prepack_conv_weights` as a post-grad pass when ``prepack``). Dynamo decides at
    trace time from ``torch._inductor.config.freezing``, so ``torch.compile(...,
    options={"freezing": True})`` alone does not freeze (measured with torch 2.14: the weights
    stayed graph inputs, copied to channels-last on every call, and no convolution was pre-packed
    or fused with its ReLU / residual add). The setting is patched for the duration of the call
    only; torch keeps such patches per thread, so other threads and the rest of the process never
    see it."""
    import torch._inductor.config as inductor_config

    changes: dict[str, Any] = {"freezing": True}
    prepack_pass = _prepack_pass() if prepack else None
    if inductor_config.post_grad_custom_post_pass is None and prepack_pass is not None:
        changes["post_grad_custom_post_pass"] = prepack_pass  # a pass of the user's own is left alone
    return inductor_config.patch(**changes)


# -- pre-packing the convolution weights of a dynamic-shape frozen graph --------------------------

@dataclass
class PackReport:
    """What :func:`prepack_conv_weights` did to the graphs of one :class:`CompiledForward`:
    ``packed`` convolution weights, and ``left`` convolutions left as they were, with the first
    ``reasons`` why."""

    packed: int = 0
    left: int = 0
    reasons: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.left += 1
        if len(self.reasons) < 5:
            self.reasons.append(reason)


_REPORT = threading.local()


@contextlib.contextmanager
def _reporting_to(report: PackReport):
    """:func:`prepack_conv_weights` adds to ``report`` for graphs compiled by this thread meanwhile."""
    before = getattr(_REPORT, "current", None)
    _REPORT.current = report
    try:
        yield
    finally:
        _REPORT.current = before


def _hint(size) -> int | None:
    """The example value of a (possibly symbolic) size, or None when there is none."""
    if isinstance(size, int):
        return size
    try:
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return int(optimization_hint(size))
    except Exception:  # noqa: BLE001 - older torch, or no hint: the caller leaves the weight plain
        hint = getattr(getattr(size, "node", None), "hint", None)
        return None if hint is None else int(hint)


def _conv_slots(node) -> tuple[int, int] | None:
    """``(input, weight)`` argument positions of a oneDNN convolution node of a frozen graph (the
    pointwise ops, and the fusions inductor has matched but not yet lowered), else None."""
    if node.op != "call_function":
        return None
    t = node.target
    mk = torch.ops.mkldnn
    if isinstance(t, functools.partial):
        return (0, 1) if getattr(t.func, "__module__", "").endswith("fx_passes.mkldnn_fusion") else None
    if t is mk._convolution_pointwise.default:
        return 0, 1
    if t is mk._convolution_pointwise.binary:  # (X, other, W, B, ...)
        return 0, 2
    if t is mk._convolution_pointwise_.binary:  # (other, X, W, B, ...): in place into other
        return 1, 2
    return None


def _pack_one(gm: torch.fx.GraphModule, node, xi: int, wi: int) -> str | None:
    """Replace the plain weight of convolution ``node`` by one packed for its example input size;
    None when done, else why not. Every argument is checked against an ordinary 2-D convolution
    first (a transposed one carries an output padding, a linear layer a 2-D weight), so a change
    of inductor's argument layout leaves the weight plain rather than packed wrongly."""
    args = node.args
    if len(args) < wi + 6:
        return "unknown argument layout"
    w, x = args[wi], args[xi]
    padding, stride, dilation, groups = args[wi + 2: wi + 6]
    if not (isinstance(w, torch.fx.Node) and w.op == "get_attr" and isinstance(x, torch.fx.Node)):
        return "weight is not a constant of the graph"
    weight = getattr(gm, w.target, None)
    if not isinstance(weight, torch.Tensor) or weight.is_mkldnn:
        return "weight already packed" if isinstance(weight, torch.Tensor) else "weight not found"
    if weight.dim() != 4 or weight.dtype not in (torch.float32, torch.bfloat16) or weight.device.type != "cpu":
        return f"not a 2-D float convolution weight ({tuple(weight.shape)}, {weight.dtype})"
    pairs = (padding, stride, dilation)
    if not (all(isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) for i in v) for v in pairs)
            and isinstance(groups, int) and groups >= 1):
        return "unknown argument layout"
    xv, out = x.meta.get("val"), node.meta.get("val")
    if not isinstance(xv, torch.Tensor) or xv.dim() != 4 or not isinstance(out, torch.Tensor) or out.dim() != 4:
        return "no example shapes"
    size = [_hint(s) for s in xv.shape]
    channels_out = _hint(out.shape[1])
    if any(s is None for s in size) or channels_out is None:
        return "no example size"
    if size[1] != weight.shape[1] * groups or channels_out != weight.shape[0]:
        return "channels do not match an ordinary convolution"
    packed = torch.ops.mkldnn._reorder_convolution_weight(weight, list(padding), list(stride), list(dilation),
                                                         groups, size)
    name = f"{w.target}_imret_packed"
    gm.register_buffer(name, packed)
    graph = node.graph
    with graph.inserting_before(node):
        new = graph.get_attr(name)
    new.meta.update(w.meta)
    node.replace_input_with(w, new)
    if not w.users:
        graph.erase_node(w)
        if not any(n.op == "get_attr" and n.target == w.target for n in graph.nodes):
            delattr(gm, w.target)  # the plain copy is not kept beside the packed one
    return None


def prepack_conv_weights(graph: torch.fx.Graph) -> None:
    """Inductor post-grad pass: pack every constant 2-D convolution weight of a frozen CPU graph
    into oneDNN's blocked layout, for the size of the graph's example input (see the module
    docstring). Convolutions it cannot vouch for are left as they were and counted, with the
    reason, in the :class:`PackReport` of the :class:`CompiledForward` being compiled."""
    report = getattr(_REPORT, "current", None) or PackReport()
    gm = graph.owning_module
    if gm is None or not torch.backends.mkldnn.is_available():
        return
    for node in list(graph.nodes):
        slots = _conv_slots(node)
        if slots is None:
            continue
        try:
            why = _pack_one(gm, node, *slots)
        except Exception as e:  # noqa: BLE001 - a pass must never break the compilation: leave it plain
            why = f"{type(e).__name__}: {str(e).strip()[:120]}"
        if why is None:
            report.packed += 1
        elif why != "weight already packed":
            report.skip(why)


@functools.lru_cache(maxsize=1)
def _prepack_pass():
    """:func:`prepack_conv_weights` as an inductor pass, or None on a torch without custom graph
    passes. Its ``uuid`` is None, which tells inductor not to look the graph up in, nor store it
    into, its FX graph cache: the packed weights are opaque oneDNN tensors that cannot be pickled
    (torch 2.14 tried, and logged the failure). The tracing and freezing that dominate the
    compile time are not cached across processes either way."""
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:
        return None

    class _Prepack(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            prepack_conv_weights(graph)

        def uuid(self):
            return None

    return _Prepack()


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, CompiledForward]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _forward_fn(model, amp_dtype: torch.dtype | None, device_type: str, step: Callable | None):
    step = step or model
    if amp_dtype is None:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return step(x).float()
    else:
        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type, dtype=amp_dtype):
                return step(x).float()
    return forward


_SERIAL = itertools.count()


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps the graphs it compiled per code object,
    told apart by guards, and these do not cover every closure value (measured with torch 2.14:
    a function differing only in its autocast arguments reused the other's graph); so that no
    two entries of the cache can share a graph, each gets its own code."""
    n = next(_SERIAL)
    code = fn.__code__.replace(co_name=f"imret_forward_{n}", co_qualname=f"imret_forward_{n}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _key(model, device: torch.device, amp_dtype, channels_last: bool, variant: Any) -> tuple:
    return (str(device), amp_dtype, channels_last, variant, _weights_key(model))


def is_cached(model, device: torch.device, amp_dtype, channels_last: bool, variant: Any = None) -> bool:
    """Whether this process holds a working compiled graph for exactly this network state."""
    entry = _CACHE.get(model, {}).get(_key(model, device, amp_dtype, channels_last, variant))
    return entry is not None and entry.failure is None


def compiled_forward(
    model: torch.nn.Module,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    step: Callable[[torch.Tensor], torch.Tensor] | None = None,
    variant: Any = None,
) -> CompiledForward:
    """The process-wide compiled forward of ``model`` (``step`` instead of ``model(x)`` when given,
    with ``variant`` naming it in the cache key) under autocast ``amp_dtype`` (None: fp32).

    Built lazily (``torch.compile(..., dynamic=True)``, called with inductor's freezing on): nothing is
    compiled until the first call, which must run under ``torch.inference_mode`` or
    ``torch.no_grad`` (freezing needs it). Entries are dropped with the model.
    """
    key = _key(model, device, amp_dtype, channels_last, variant)
    with _LOCK:
        per_model = _CACHE.setdefault(model, {})
        entry = per_model.get(key)
        if entry is None:
            for old in [k for k in per_model if k[:4] == key[:4]]:  # the weights changed: drop stale graphs
                del per_model[old]
            fn = _forward_fn(model, amp_dtype, device.type, step)
            graph = torch.compile(_own_code(fn), dynamic=True)  # frozen: CompiledForward calls it under _freezing()
            packed = None
            if device.type == "cpu" and torch.backends.mkldnn.is_available() and _prepack_pass() is not None:
                packed = torch.compile(_own_code(fn), dynamic=True)
            entry = per_model[key] = CompiledForward(eager=fn, graph=graph, packed=packed)
    return entry


def compile_decision(
    mode: str,
    *,
    device: torch.device,
    n_images: int,
    hooks: bool = False,
    refined: bool = False,
    cached: bool = False,
) -> tuple[bool, str]:
    """Whether to compile, and why: ``mode`` (:data:`COMPILE_MODES`) for a run of ``n_images``
    on ``device``; ``hooks``: the model carries forward hooks for the run (ReLU-shift), which a
    frozen graph would not see; ``refined``: SuperGlobal pooling switches replace the head's
    forward (compiled with ``"on"`` only: ``"auto"`` keeps to the path the tests check);
    ``cached``: a compiled graph for this network state exists.

    Returns ``(True | False | None, reason)``; None (``"auto"`` on a long run): time the first
    :data:`AUTO_TIMED_IMAGES` images eagerly, then ask :func:`compile_pays`."""
    check_compile(mode)
    if mode == "off":
        return False, "compile off"
    if hooks:
        return False, "eager: ReLU-shift hooks the trunk, which a compiled graph would not follow"
    if mode == "on":
        return True, "compile on"
    if cached:
        return True, "auto: a compiled graph is cached in this process"
    if refined:
        return False, "auto: eager with refinement switches (compile='on' compiles them too)"
    if device.type != "cpu":
        return False, f"auto: eager on {device.type} (compile is automatic on the CPU only; use compile='on')"
    if shutil.which("c++") is None and shutil.which("g++") is None and shutil.which("clang++") is None:
        return False, "auto: eager, no C++ compiler on the PATH for inductor"
    if n_images < AUTO_MIN_IMAGES:
        return False, f"auto: eager for {n_images} image(s) (compiling is considered from {AUTO_MIN_IMAGES})"
    return None, f"auto: {n_images} images; decided after timing {AUTO_TIMED_IMAGES} eager ones"


def resolve_auto(mode: str, *, device: str | torch.device, n_images: int, refined: bool = False) -> str:
    """``"auto"`` decided as far as the count allows for a run of ``n_images`` done in several
    :func:`imret.extract.extract` calls (a store adds 64 images at a time): ``"on"``, ``"off"``, or
    ``"auto"`` when it depends on the timing (pass ``compile_horizon`` to each call then); other
    modes unchanged."""
    if check_compile(mode) != "auto":
        return mode
    use, _ = compile_decision(mode, device=torch.device(device), n_images=n_images, refined=refined)
    return "auto" if use is None else ("on" if use else "off")
