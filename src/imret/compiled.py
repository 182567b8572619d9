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
Freezing folds the weights into the graph as constants and fuses each convolution with its ReLU
and residual add (oneDNN's ``_convolution_pointwise``). Inductor pre-packs such weights into
oneDNN's blocked layout only in graphs of fixed input size: in this dynamic-shape graph they stay
plain, and oneDNN reorders each of them on every call (~8 ms per ResNet50 pass on 2 cores,
whatever the size; BENCHMARKS.md, extraction reading). So on the CPU a shape that recurs
(:data:`FIXED_AFTER` times) gets a graph compiled for its fixed shape, where inductor packs
them (:class:`CompiledForward`). A later change of the weights (an
optimizer step, ``load_state_dict``) changes the key (each tensor's ``_version`` counter), so a
stale graph is never used. Across processes inductor's on-disk caches (FX graph and AOTAutograd
caches, in ``$TORCHINDUCTOR_CACHE_DIR``, by default ``<tmp>/torchinductor_<user>``) make the
second process's compilation much cheaper; dynamo's tracing is still paid once per process.
"""

from __future__ import annotations

import itertools
import shutil
import threading
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["COMPILE_MODES", "AUTO_MIN_IMAGES", "AUTO_TIMED_IMAGES", "AUTO_MIN_EAGER_SECONDS", "FIXED_AFTER",
           "MAX_FIXED", "compile_pays",
           "check_compile", "compile_decision", "resolve_auto",
           "compiled_forward", "is_cached", "CompiledForward", "inductor_cache_dir"]

COMPILE_MODES = ("auto", "on", "off")

AUTO_MIN_IMAGES = 200
"""``compile="auto"`` considers compiling for runs of at least this many images (unless a graph
is already cached in the process); shorter runs (queries, small folders) stay eager."""

FIXED_AFTER = 32
"""An input shape met this many times (per network state, in this process) gets a graph compiled
for its fixed shape (see :class:`CompiledForward`): a shape that recurs this often in a run is
likely to recur many more times, and each fixed-shape compilation (11-12 s for a ResNet50 on 2
cores) is repaid after some 1,000-1,500 calls of its shape."""

MAX_FIXED = 6
"""At most this many fixed-shape graphs per network state (the graph's memory: a packed copy of
the weights each); other shapes keep the dynamic-shape graph. Six covers landscape and portrait
photos of the most common aspect ratio at three scales, ``(1, 2**-0.5, 0.5)``."""

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
class CompiledForward:
    """One network's compiled per-scale forward: ``(B, 3, H, W) -> (B, D)`` float32.

    Calls the compiled graph; the first call compiles it. Should compiling (or running the
    graph) raise, the error is kept in ``failure``, a ``UserWarning`` names it, and this and
    every later call run ``eager`` instead.

    On the CPU, an input shape met :data:`FIXED_AFTER` times gets a graph of its own, compiled
    for that fixed shape (``fixed``, up to :data:`MAX_FIXED` shapes): there inductor pre-packs the
    convolution weights into oneDNN's blocked layout, which it does not do in the dynamic-shape
    graph (where oneDNN reorders every weight on every call, ~8 ms per ResNet50 pass on 2 cores).
    Measured: 1.07x the dynamic graph at 768 x 1024, 1.16x at 384 x 512, for 11-12 s of
    compilation per shape. Should a fixed-shape compilation fail, the dynamic graph serves every
    shape from then on (``fixed_failure`` says why).
    """

    eager: Callable[[torch.Tensor], torch.Tensor]
    graph: Callable[[torch.Tensor], torch.Tensor]
    fixed_graph: Callable[[torch.Tensor], torch.Tensor] | None = None
    failure: str | None = None
    fixed_failure: str | None = None
    ready: bool = False  # compiled and run once
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    seen: dict[tuple, int] = field(default_factory=dict, repr=False)
    fixed: set = field(default_factory=set)  # shapes with a compiled fixed-shape graph

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready and self.failure is None:
            with self.lock:  # one thread compiles; the others wait for its graph
                if not self.ready and self.failure is None:
                    y = self._graph_or_none(x)
                    self.ready = y is not None
                    if y is not None:
                        self.seen[tuple(x.shape)] = 1
                        return y
        if self.failure is None:
            y = self._fixed_or_none(x) if self.fixed_graph is not None else None
            if y is None:
                y = self._graph_or_none(x)
            if y is not None:
                return y
        return self.eager(x)

    def _fixed_or_none(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fixed-shape graph's output for ``x``'s shape once that shape qualifies (compiling
        it, under the lock, on its first call), else None."""
        shape = tuple(x.shape)
        with self.lock:
            self.seen[shape] = n = self.seen.get(shape, 0) + 1
            if shape not in self.fixed:
                if n < FIXED_AFTER or len(self.fixed) >= MAX_FIXED or self.fixed_graph is None:
                    return None
                y = self._fixed_call(x)
                if y is not None:
                    self.fixed.add(shape)
                return y
        return self._fixed_call(x)

    def _fixed_call(self, x: torch.Tensor) -> torch.Tensor | None:
        fixed = self.fixed_graph
        if fixed is None:
            return None
        try:
            with _freezing():
                return fixed(x)
        except Exception as e:  # noqa: BLE001 - the dynamic graph serves every shape from now on
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.fixed_failure = f"{type(e).__name__}: {first}"[:300]
            self.fixed_graph = None
            warnings.warn(f"a fixed-shape graph failed ({self.fixed_failure}); the dynamic-shape graph serves "
                          "every shape", UserWarning, stacklevel=4)
            return None

    def _graph_or_none(self, x: torch.Tensor) -> torch.Tensor | None:
        try:
            with _freezing():
                return self.graph(x)
        except Exception as e:  # noqa: BLE001 - any compiler error: fall back, with the reason
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.failure = f"{type(e).__name__}: {first}"[:300]
            warnings.warn(f"torch.compile failed ({self.failure}); extracting in eager mode", UserWarning, stacklevel=3)
            return None


def _freezing():
    """Inductor's weight freezing, for the calls that may (re)compile a graph. Dynamo decides at
    trace time from ``torch._inductor.config.freezing``, so ``torch.compile(...,
    options={"freezing": True})`` alone does not freeze (measured with torch 2.14: the weights
    stayed graph inputs, copied to channels-last on every call, and no convolution was pre-packed
    or fused with its ReLU / residual add). The setting is patched for the duration of the call
    only; torch keeps such patches per thread, so other threads and the rest of the process never
    see it."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


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
            # one code object for the fixed-shape graphs: dynamo keeps one graph per shape, guarded
            # (MAX_FIXED stays under its limit of 8 recompilations)
            fixed = torch.compile(_own_code(fn), dynamic=False) if device.type == "cpu" else None
            entry = per_model[key] = CompiledForward(eager=fn, graph=graph, fixed_graph=fixed)
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
