"""One retrieval pipeline: encoder → whitening → αDBA → backend → exact re-score → query
expansion → re-rankers → ranked results.

Every caller that turns queries into rankings goes through this module: :class:`Retriever`
for a database held in memory (evaluation, benchmarks, the trainer's validation), and
:class:`imret.index.store.Store`, which keeps the same steps over its files (it supplies
the searcher and the stored rows, and uses :func:`postprocess`, :func:`search_stage` and
:func:`expand_and_search`).

The steps, for raw model descriptors ``x`` (``(Q, D)`` rows, L2-normalised):

1. whitening (optional; :class:`imret.whitening.Whitening`): ``x -> W(x)``, also applied to
   the database rows;
2. αDBA (optional, database side, Radenović et al. / Gordo et al.): every database row is
   replaced by the α-weighted mean of itself and its ``k`` nearest database rows, once, when
   the database is indexed;
3. the backend (:mod:`imret.index`): exact, FAISS or Milvus top-k by inner product;
4. approximate candidates are re-scored exactly with the stored float32 rows, and a query
   for which an approximate backend found fewer than ``min(k, N)`` rows is answered exactly;
5. query expansion (optional; :class:`imret.expansion.QueryExpansion`): AQE / αQE with the
   top results, then one more search with the expanded query;
6. re-rankers (optional; any :class:`Reranker`), in order, on the final candidates.

Results are :class:`SearchResult` ``(scores, ids)``, both ``(Q, k)``: float32 cosines in
decreasing order and int64 ids, padded with ``-inf`` / ``-1``.

**Text queries** (a joint image–caption model: an image model whose descriptors are ``φ`` and
a :class:`~imret.text.CaptionEncoder` ``θ`` of the same dimension, Gordo & Larlus, CVPR 2017)
rank the database by ``θ(t)·φ``: the inner product the two encoders were trained for. So a
text query goes through the pipeline only where every step keeps that meaning
(:func:`check_text_pipeline`):

* whitening and αDBA are **refused** for text queries. Whitening is fitted on image
  descriptors: applied to ``θ`` it would centre a caption on the mean *image*, rescale it by the
  image variances and keep only the image principal axes, and the score would become
  ``(θ − μ)ᵀ Σ⁻¹ (φ − μ)`` (normalised), a metric the caption encoder was never trained for; and
  αDBA replaces every database row by a mean of image neighbours, so the rows are no longer the
  ``φ`` that ``θ`` was trained against. Neither can be undone on the query side (the whitened rows
  are normalised per image and may be reduced in dimension), so rather than rank text by a
  score nobody trained, the search stops with a message saying how to search by text (a
  database indexed without them);
* query expansion is **kept**: it mixes the query with its top database rows, which for a text
  query are ``φ`` rows of the same space (pseudo-relevance feedback from the images found);
* re-rankers that look at the query's pixels (geometric verification ``sift`` / ``cnn``,
  localisation ``aml``; :func:`needs_query_image`) are **refused**: a text has no pixels.
  Stages that work on descriptors alone (``sg``, SuperGlobal top-M refinement, which refines
  the query with its top rows as query expansion does) run as for an image query.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ._checks import non_negative_float, positive_int
from .expansion import QueryExpansion, alpha_database_augmentation, expand_with_neighbours
from .index import check_spec, create_backend, parse_spec
from .index.base import Backend, as_rows
from .index.exact import ExactBackend
from .index.tuning import AutoTarget, TuningRecord, auto_target, check_tunable, tune
from .whitening import Whitening

__all__ = [
    "SearchResult",
    "Encoder",
    "Reranker",
    "Retriever",
    "postprocess",
    "search_stage",
    "expand_and_search",
    "rescore",
    "fill_short",
    "apply_rerankers",
    "carry_extras",
    "rerank_depth",
    "truncate",
    "needs_query_image",
    "check_text_pipeline",
]

SearchFn = Callable[[np.ndarray, int], "tuple[np.ndarray, np.ndarray]"]
RowsFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SearchResult:
    """Ranked results of a batch of queries: ``scores`` float32 and ``ids`` int64, ``(Q, k)``,
    padded with ``-inf`` / ``-1``. Unpacks as ``scores, ids = result``.

    ``extras`` holds what re-rankers found per hit, arrays whose leading shape is ``(Q, k)``
    aligned with ``ids`` (for example ``"inliers"`` of geometric verification, ``"box"`` of
    localisation); a hit a re-ranker did not look at has its fill value (``-1``, ``NaN``)."""

    scores: np.ndarray
    ids: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __iter__(self):
        yield self.scores
        yield self.ids

    def dense(self, n: int) -> np.ndarray:
        """The ``(Q, n)`` score matrix over ids ``0..n-1``: found ids get their score, the
        rest ``-inf`` (what the revisitop evaluation takes, ranked the same way)."""
        out = np.full((self.ids.shape[0], n), -np.inf, np.float32)
        q, j = np.nonzero(self.ids >= 0)
        out[q, self.ids[q, j]] = self.scores[q, j]
        return out


@runtime_checkable
class Reranker(Protocol):
    """A last stage that reorders (and may re-score or drop) each query's candidates.

    ``rerank(x, scores, ids, images=None)`` gets the post-processed query rows ``(Q, D')``,
    the current ``(Q, k)`` results and, when the search started from images, ``(image, box)``
    per query (a path as ``str``, or the PIL image / array given); it returns new
    ``(scores, ids)`` of the same shape, padded with ``-inf`` / ``-1``, scores decreasing
    along each row (evaluation ranks by score), or ``(scores, ids, extras)`` with ``extras``
    a dict of per-hit arrays of leading shape ``(Q, k)`` aligned with the returned ids.
    """

    def rerank(self, x: np.ndarray, scores: np.ndarray, ids: np.ndarray,
               images: Sequence[tuple[str, Any]] | None = None) -> tuple[np.ndarray, np.ndarray]: ...


# --- the pure steps, shared with the store ------------------------------------------------------


def postprocess(x: np.ndarray, whitening: Whitening | None, *, dim: int | None = None,
                name: str = "descriptors") -> np.ndarray:
    """Raw descriptors ``(N, D)`` (queries or database rows) as the rows the backend holds:
    float32, checked (finite; ``D == dim`` when given), whitened when ``whitening`` is set
    (``(N, D) -> (N, D')``, L2-normalised). The one implementation of this step, for the
    :class:`Retriever` and the store."""
    x = as_rows(x, dim, name)
    return x if whitening is None else whitening.apply(x)


def fill_short(x: np.ndarray, k: int, scores: np.ndarray, ids: np.ndarray, n_live: int,
               exact: Callable[[], Backend]) -> tuple[np.ndarray, np.ndarray]:
    """Answer exactly the queries for which an approximate backend returned fewer than
    ``min(k, n_live)`` ids (a graph index such as HNSW misses rows when k nears the number of
    rows, more so with removed rows left in its graph). ``exact()`` gives the exact searcher
    (built only when needed)."""
    want = min(k, n_live)
    short = np.flatnonzero((ids >= 0).sum(axis=1) < want)
    if short.size == 0:
        return scores, ids
    s2, i2 = exact().search(x[short], k)
    scores, ids = scores.copy(), ids.copy()
    scores[short], ids[short] = s2, i2
    return scores, ids


def rescore(x: np.ndarray, scores: np.ndarray, ids: np.ndarray, rows: RowsFn) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosines of the candidates (``rows(ids)`` gives their ``(Q, k, D')`` stored rows,
    zeros for padding) and the candidates re-ordered by them (stable for ties)."""
    if ids.size == 0:
        return scores, ids
    true = np.einsum("qkd,qd->qk", rows(ids), x)
    true = np.where(ids >= 0, true, -np.inf).astype(np.float32)
    order = np.argsort(-true, axis=1, kind="stable")
    return np.take_along_axis(true, order, 1), np.take_along_axis(ids, order, 1)


def search_stage(x: np.ndarray, k: int, searcher: Backend, *, n_live: int, rows: RowsFn | None,
                 exact: Callable[[], Backend] | None = None,
                 raw_search: SearchFn | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One search of post-processed queries ``x``: the backend's top k, then for an
    approximate backend the short queries answered exactly (:func:`fill_short`) and the
    candidates re-scored with the stored rows (:func:`rescore`; ``rows=None`` skips it).

    ``raw_search`` replaces ``searcher.search`` (the store filters removals a shared engine
    has not applied yet there)."""
    scores, ids = (raw_search or searcher.search)(x, k)
    if isinstance(searcher, ExactBackend):
        return scores, ids
    if exact is not None and ids.size:
        scores, ids = fill_short(x, k, scores, ids, n_live, exact)
    if rows is not None:
        scores, ids = rescore(x, scores, ids, rows)
    return scores, ids


def expand_and_search(x: np.ndarray, k: int, search: SearchFn, rows: RowsFn, qe: QueryExpansion,
                      n_live: int) -> tuple[np.ndarray, np.ndarray]:
    """Search, then query expansion (when ``qe.method != "none"``): each query is replaced
    by the (α-weighted) mean of itself and its top ``qe.k`` rows, and searched again.
    ``search(x, k)`` is one search stage; ``rows(ids)`` gives stored rows ``(Q, k, D')``."""
    scores, ids = search(x, k)
    if qe.method == "none" or n_live == 0:
        return scores, ids
    s2, i2 = (scores, ids) if ids.shape[1] >= qe.k else search(x, qe.k)
    top_s, top_i = s2[:, : qe.k], i2[:, : qe.k]
    x2 = expand_with_neighbours(x, rows(top_i), np.where(top_i >= 0, top_s, 0.0), qe.weight_alpha)
    return search(x2, k)


def carry_extras(extras: dict[str, np.ndarray], old_ids: np.ndarray, new_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per-hit arrays aligned with ``old_ids`` ``(Q, k)``, realigned with ``new_ids`` (the
    same queries after a re-ranker reordered or dropped hits): a hit keeps its values, a hit
    not in ``old_ids`` gets the fill value (NaN for floats, -1 for integers, False)."""
    if not extras:
        return {}
    q, k = new_ids.shape
    # position of each new id in its row of old_ids (-1: not there)
    pos = np.full((q, k), -1, np.int64)
    for r in range(q):
        row = old_ids[r]
        order = np.argsort(row, kind="stable")
        found = np.searchsorted(row[order], new_ids[r])
        found = np.minimum(found, row.size - 1)
        hit = (row[order][found] == new_ids[r]) & (new_ids[r] >= 0)
        pos[r, hit] = order[found[hit]]
    out = {}
    for name, a in extras.items():
        fill = np.nan if np.issubdtype(a.dtype, np.floating) else (False if a.dtype == bool else -1)
        b = np.full((q, k) + a.shape[2:], fill, a.dtype)
        qi, ji = np.nonzero(pos >= 0)
        b[qi, ji] = a[qi, pos[qi, ji]]
        out[name] = b
    return out


def rerank_depth(rerankers: Sequence["Reranker"]) -> int:
    """How many candidates the re-rankers look at (their ``top_k``, or ``m`` for top-M
    refinement): the first stage fetches at least that many, whatever ``k`` is asked for."""
    depth = 0
    for r in rerankers:
        for attr in ("top_k", "m"):
            v = getattr(r, attr, None)
            if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
                depth = max(depth, int(v))
                break
    return depth


def truncate(result: SearchResult, k: int) -> SearchResult:
    """The first ``k`` hits of each query (extras cut the same way)."""
    if result.ids.shape[1] <= k:
        return result
    return SearchResult(np.ascontiguousarray(result.scores[:, :k]), np.ascontiguousarray(result.ids[:, :k]),
                        {n: np.ascontiguousarray(a[:, :k]) for n, a in result.extras.items()})


def apply_rerankers(rerankers: Sequence["Reranker"], x: np.ndarray, scores: np.ndarray, ids: np.ndarray,
                    images: Sequence[tuple[Any, Any]] | None) -> SearchResult:
    """Run ``rerankers`` in order on a first-stage ranking; collect their per-hit extras
    (a later re-ranker's reordering carries the earlier ones' values along)."""
    extras: dict[str, np.ndarray] = {}
    for r in rerankers:
        out = r.rerank(x, scores, ids, images=images)
        if not isinstance(out, tuple) or len(out) not in (2, 3):
            raise TypeError(f"re-ranker {r!r} must return (scores, ids) or (scores, ids, extras), got {type(out).__name__}")
        new_scores, new_ids = np.asarray(out[0], np.float32), np.asarray(out[1], np.int64)
        if new_ids.shape != ids.shape or new_scores.shape != ids.shape:
            raise ValueError(f"re-ranker {r!r} returned shapes {new_scores.shape} / {new_ids.shape}, expected {ids.shape}")
        extras = carry_extras(extras, ids, new_ids)
        if len(out) == 3 and out[2]:
            for name, a in out[2].items():
                a = np.asarray(a)
                if a.shape[:2] != ids.shape:
                    raise ValueError(f"re-ranker {r!r} returned extras {name!r} of shape {a.shape}, expected {ids.shape} + ...")
                extras[name] = a
        scores, ids = new_scores, new_ids
    return SearchResult(np.ascontiguousarray(scores, np.float32), np.ascontiguousarray(ids, np.int64), extras)


def _check_k(k: Any) -> int:
    return positive_int(k, "k")


# the stages that read the query image's pixels (local features, localisation maps), by class
# name: imported lazily elsewhere, so they are recognised without importing OpenCV here
_PIXEL_STAGES = frozenset({"GeometricVerifier", "LocalizationReranker"})


def needs_query_image(stage: Any) -> bool:
    """Whether a re-ranker reads the query's pixels (and so cannot re-rank a text query): its
    ``needs_query_image`` attribute when it has one, else True for geometric verification and
    localisation (``sift``, ``cnn``, ``aml``), False for the rest (``sg`` works on rows)."""
    if isinstance(stage, str) or type(stage).__name__ == "RerankSpec":  # a spec: sift, cnn and aml need pixels
        from .rerank import parse_rerank

        return parse_rerank(stage).kind in ("sift", "cnn", "aml")
    flag = getattr(stage, "needs_query_image", None)
    if isinstance(flag, bool):
        return flag
    return type(stage).__name__ in _PIXEL_STAGES


def check_text_pipeline(*, whitening: Any, dba: Any, rerankers: Sequence[Any] = (), where: str = "this index",
                        fix: str = "") -> None:
    """Raise ``ValueError`` when a text query cannot be searched through this post-processing
    and these re-rankers (see the module docstring: whitening and αDBA change the metric the
    caption encoder was trained for; some re-rankers need pixels). ``whitening`` is a
    :class:`~imret.whitening.Whitening`, its kind (a ``str``) or None; ``rerankers`` stages or
    spec strings. ``where`` names the index, ``fix`` says what to do, in the messages."""
    steps = []
    if whitening is not None:
        kind = whitening if isinstance(whitening, str) else getattr(whitening, "kind", "fitted")
        steps.append(f"whitening ({kind}, fitted on image descriptors)")
    if dba is not None:
        steps.append("alpha-DBA (database rows replaced by means of image neighbours)")
    if steps:
        raise ValueError(f"text queries cannot be searched in {where}: its vectors are post-processed by "
                         f"{' and '.join(steps)}, and a caption model is trained against the raw image descriptors "
                         "(the ranking must be by caption embedding . image descriptor); "
                         + (fix or "search by text in an index without whitening and alpha-DBA"))
    pixel = [r for r in rerankers if needs_query_image(r)]
    if pixel:
        raise ValueError(f"re-ranker(s) {', '.join(map(repr, pixel))} look at the query image's pixels, and a text "
                         "query has none; search by text without them (re-rankers on descriptors, such as sg, "
                         "may stay)")


# --- the encoder --------------------------------------------------------------------------------


@dataclass
class Encoder:
    """A model and how images become its descriptors: ``encode(paths) -> (N, D)`` rows.

    The extraction settings (long side ``image_size``, ``scales`` combined by the GeM power
    mean, ``crop_resize`` convention for query boxes, JPEG ``draft`` decoding, ``max_pixels``,
    ``min_size`` enlargement of small images)
    are part of the descriptor's meaning, so a database and its queries share one encoder;
    the run-time ones (``device``, ``precision``, ``batch_size``, ``workers``, ``compile``,
    ``decode``: where JPEGs are decoded, see :func:`imret.extract.extract`) are not.
    """

    model: Any
    image_size: int = 1024
    scales: tuple[float, ...] = (1.0,)
    crop_resize: str = "image"
    draft: bool = True
    max_pixels: int | None = None
    min_size: int | None = None
    refinement: Any = None  # an imret.refinement.Refinement (SuperGlobal pooling switches) or None
    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int | None = None
    workers: int = 2
    progress: bool = False
    compile: str = "auto"  # torch.compile of the network: auto | on | off (see imret.compiled)
    decode: str = "auto"

    @property
    def dim(self) -> int:
        return int(self.model.dim)

    def encode(self, images: Sequence[Any], bboxes=None, *, on_error: str = "skip"):
        """Descriptors of ``images`` (paths, PIL images or ``H x W x 3`` uint8 RGB arrays;
        queries may have ``(x1, y1, x2, y2)`` boxes): an :class:`imret.extract.Extraction`
        (rows in input order of the images that could be read; the rest in ``skipped`` with
        the reason, or an error with ``on_error="raise"``). Other kinds raise ``TypeError``."""
        from .extract import extract

        return extract(self.model, images, bboxes=bboxes, scales=self.scales,
                       image_size=self.image_size, crop_resize=self.crop_resize, draft=self.draft,
                       max_pixels=self.max_pixels, min_size=self.min_size, refinement=self.refinement,
                       device=self.device, precision=self.precision,
                       batch_size=self.batch_size, workers=self.workers, on_error=on_error,
                       progress=self.progress, compile=self.compile, decode=self.decode)


# --- the retriever --------------------------------------------------------------------------


@dataclass
class Retriever:
    """The whole pipeline over a database held in memory (see the module docstring).

    Build it with the post-processing, index the database's raw descriptors (or images),
    then search with query descriptors or images::

        r = Retriever(encoder=Encoder(model, image_size=1024), whitening=w, dba=(2, 3.0),
                      backend="exact", query_expansion=QueryExpansion("alpha", 2, 3.0))
        r.index(db_descriptors)                    # or r.index_images(paths)
        scores, ids = r.search(vectors=q, k=100)   # or r.search(images=paths, bboxes=boxes)

    With the caption encoder of a joint image–caption model (``text_encoder``, of the image
    model's dimension), ``r.search(text="a dog catching a frisbee")`` ranks by ``θ(t)·φ`` (no
    whitening or αDBA then; see the module docstring).

    Attributes:
        encoder: turns images into raw descriptors (needed only to index or search images).
        whitening: applied to database and query descriptors (None: none).
        dba: ``(k, alpha)`` of αDBA over the database (None: none).
        backend: a backend spec string (``exact``, ``ann``, ``faiss:...``, ``milvus:...``, or
            ``auto?recall=0.95&k=100``: the index tuned on the indexed rows as the store tunes it,
            :func:`imret.index.tuning.tune`; what it chose is :attr:`tuning`) or a
            :class:`~imret.index.base.Backend` to fill.
        query_expansion: applied at search time (``QueryExpansion()`` is none).
        rescore: re-score an approximate backend's candidates with the stored rows.
        rerankers: last stages, applied in order.
        text_encoder: a :class:`~imret.text.CaptionEncoder` (or the path of one, loaded with
            :func:`imret.text.queries.load_text_model`) for text queries.
    """

    encoder: Encoder | None = None
    whitening: Whitening | None = None
    dba: tuple[int, float] | None = None
    backend: str | Backend = "exact"
    query_expansion: QueryExpansion = field(default_factory=QueryExpansion)
    rescore: bool = True
    rerankers: Sequence[Reranker] = ()
    text_encoder: Any = None

    def __post_init__(self) -> None:
        if self.dba is not None:
            if not isinstance(self.dba, (tuple, list)) or len(self.dba) != 2:
                raise ValueError(f"dba must be a pair (k, alpha), got {self.dba!r}")
            self.dba = (positive_int(self.dba[0], "dba k"), non_negative_float(self.dba[1], "dba alpha"))
        if isinstance(self.backend, str):
            check_spec(self.backend)  # fail early: the kind, every parameter, the package it needs
        for r in self.rerankers:
            if not isinstance(r, Reranker):
                raise TypeError(f"re-rankers need a rerank(x, scores, ids, images=None) method, got {r!r}")
        if isinstance(self.text_encoder, (str, os.PathLike)):
            from .text.queries import load_text_model

            self.text_encoder = load_text_model(self.text_encoder)
        if self.text_encoder is not None:
            if not callable(getattr(self.text_encoder, "encode_text", None)):
                raise TypeError(f"text_encoder must be a CaptionEncoder (encode_text(list[str]) -> (N, D)) or the "
                                f"path of one, got {type(self.text_encoder).__name__}")
            dims = {"the encoder's model": self.encoder.dim if self.encoder is not None else None,
                    "the whitening's input": self.whitening.input_dim if self.whitening is not None else None}
            for what, d in dims.items():
                if d is not None and int(self.text_encoder.dim) != d:
                    raise ValueError(f"the caption encoder embeds text in {self.text_encoder.dim}-D, but {what} is "
                                     f"{d}-D; a joint model's caption encoder and image model share one dimension")
        self._raw_dim: int | None = None
        self._vectors: np.ndarray | None = None
        self._ids: np.ndarray | None = None
        self._row_of: np.ndarray | None = None
        self._searcher: Backend | None = None
        self._exact: ExactBackend | None = None
        self._tuning: TuningRecord | None = None

    # -- the database ---------------------------------------------------------------------

    def postprocess(self, x: np.ndarray) -> np.ndarray:
        """Whitening of raw descriptors ``(N, D)`` (queries or database rows)."""
        dim = self.whitening.input_dim if self.whitening is not None else (
            self.encoder.dim if self.encoder is not None else None)
        return postprocess(x, self.whitening, dim=dim)

    def index(self, descriptors: np.ndarray, ids: np.ndarray | None = None) -> "Retriever":
        """Index the database's raw descriptors ``(N, D)`` (ids default to ``0..N-1``): whiten,
        αDBA, then fill the backend (trained on the rows when it needs training). Replaces
        what was indexed before. Returns ``self``."""
        v = self.postprocess(descriptors)
        n = v.shape[0]
        raw_dim = int(np.shape(descriptors)[-1])
        ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64).ravel()
        if ids.shape != (n,) or (n and ids.min() < 0) or np.unique(ids).size != n:
            raise ValueError(f"ids must be {n} distinct non-negative integers, got shape {ids.shape}")
        if self.dba is not None and n > 1:
            v = alpha_database_augmentation(v, min(int(self.dba[0]), n - 1), float(self.dba[1]))
        self._vectors = np.ascontiguousarray(v, dtype=np.float32)
        self._raw_dim = raw_dim
        self._ids = ids
        self._row_of = np.full(int(ids.max()) + 1 if n else 0, -1, np.int64)
        self._row_of[ids] = np.arange(n)
        self._exact = ExactBackend.from_matrix(self._vectors, ids=ids)
        self._tuning = None
        target = self._auto_target()
        if target is not None:  # the index chosen on these rows, as the store chooses it
            check_tunable(n, target, "the database")
            tuned = tune(self._vectors, None, target, ids=ids)
            self._tuning = tuned.record
            self._searcher = tuned.backend if tuned.backend is not None else self._exact
            return self
        if isinstance(self.backend, Backend):
            b = self.backend
        else:
            b = create_backend(self.backend, v.shape[1], n_hint=n)
        if isinstance(b, ExactBackend) and b.ntotal == 0:
            self._searcher = self._exact
            return self
        if not b.is_trained:
            if n < b.min_train_size:
                raise ValueError(f"backend {b.spec!r} needs {b.min_train_size} rows to train; the database has {n}")
            b.train(self._vectors)
        b.add(self._vectors, ids)
        self._searcher = b
        return self

    def index_images(self, images: Sequence[str | os.PathLike], **encode_kw: Any):
        """Encode and index database images (ids are their positions in ``images``; files
        that cannot be read are left out). Returns the :class:`~imret.extract.Extraction`."""
        target = self._auto_target()
        if target is not None:  # too few images to tune: say so before extracting them
            check_tunable(len(images), target, "the database")
        ex = self._encoder().encode(images, **encode_kw)
        self.index(ex.descriptors, np.asarray(ex.indices, dtype=np.int64))
        return ex

    def _auto_target(self) -> AutoTarget | None:
        """The target of an ``auto`` backend spec; None for any other backend."""
        if isinstance(self.backend, str):
            spec = parse_spec(self.backend)
            if spec.kind == "auto":
                return auto_target(spec.params)
        return None

    @property
    def tuning(self) -> TuningRecord | None:
        """What an ``auto`` backend chose and measured at the last :meth:`index` (None for
        other backends): the spec, held-out recall@k and its lower bound, QPS against exact."""
        return self._tuning

    @property
    def vectors(self) -> np.ndarray:
        """The indexed (whitened, augmented) database rows ``(N, D')``, in index order."""
        self._require_index()
        return self._vectors

    def __len__(self) -> int:
        return 0 if self._ids is None else int(self._ids.size)

    # -- searching ------------------------------------------------------------------------

    def _encoder(self) -> Encoder:
        if self.encoder is None:
            raise ValueError("this Retriever has no encoder: give Retriever(encoder=Encoder(model, ...)) "
                             "to index or search images, or pass descriptors (vectors=...)")
        return self.encoder

    def _require_index(self) -> None:
        if self._searcher is None:
            raise ValueError("nothing indexed yet: call index(descriptors) or index_images(paths) first")

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The indexed rows of an id array (any shape) as ``ids.shape + (D',)`` float32;
        padding ids (-1) give zeros (what re-rankers such as top-M refinement read)."""
        self._require_index()
        return self._rows(np.asarray(ids, dtype=np.int64))

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        valid = ids >= 0
        rows = self._vectors[self._row_of[np.where(valid, ids, self._ids[0])].ravel()]
        return np.where(valid[..., None], rows.reshape(*ids.shape, -1), 0.0).astype(np.float32)

    def _stage(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return search_stage(x, k, self._searcher, n_live=len(self), rows=self._rows if self.rescore else None,
                            exact=lambda: self._exact)

    def search(self, images: Sequence[Any] | None = None, *, bboxes=None,
               vectors: np.ndarray | None = None, text: str | Sequence[str] | None = None, k: int = 10,
               query_expansion: QueryExpansion | None = None,
               rerankers: Sequence[Reranker] | None = None) -> SearchResult:
        """Rank the database for each query: query ``images`` (paths, PIL images or
        ``H x W x 3`` uint8 RGB arrays, or one of them alone; optional boxes; encoded with the
        encoder, an image that cannot be read raises :class:`~imret.images.ImageError`) or raw
        model descriptors ``vectors`` ``(Q, D)``. Given both, ``vectors`` are the queries'
        descriptors (already extracted) and ``images`` only go to the re-rankers that look
        at pixels. ``query_expansion`` overrides the retriever's for this call, ``rerankers``
        its re-rankers. Re-rankers get the queries as given (paths as ``str``). The result's
        ``extras`` hold what the re-rankers found per hit.

        ``text``: one text query or a list of them instead (needs ``text_encoder``), ranked by
        ``θ(t)·φ``; refused (``ValueError``) when the database is whitened or augmented by αDBA,
        when a re-ranker needs the query's pixels (see the module docstring), and for a text
        none of whose words the caption encoder knows
        (:class:`~imret.text.queries.NoKnownWordError`)."""
        from .images import check_image_input, image_list, is_single_image

        k = _check_k(k)
        self._require_index()
        stages = list(self.rerankers if rerankers is None else rerankers)
        for r in stages:
            if not isinstance(r, Reranker):
                raise TypeError(f"re-rankers need a rerank(x, scores, ids, images=None) method, got {r!r}")
        if text is not None:
            if images is not None or vectors is not None or bboxes is not None:
                raise ValueError("give text=... alone: a text query has no image, box or descriptor")
            vectors = self.encode_text(text, rerankers=stages)
        elif images is None and vectors is None:
            raise ValueError("give images=... or vectors=... (or both: descriptors and the images they came from), "
                             "or text=...")
        shown = None
        if images is not None:
            items = [images] if is_single_image(images) else image_list(images)
            items = [check_image_input(x, i) for i, x in enumerate(items)]
            if bboxes is not None and len(bboxes) != len(items):
                raise ValueError(f"got {len(bboxes)} bboxes for {len(items)} queries; give one box (or None) per query")
            if vectors is None:
                vectors = self._encoder().encode(items, bboxes, on_error="raise").descriptors
            else:
                shape = np.shape(vectors)
                if (1 if len(shape) == 1 else shape[0]) != len(items):
                    raise ValueError(f"got {len(items)} images for query vectors of shape {shape}; give one image per row")
            shown = list(zip(items, bboxes if bboxes is not None else [None] * len(items)))
        x = self.postprocess(np.asarray(vectors, dtype=np.float32))
        qe = self.query_expansion if query_expansion is None else query_expansion
        depth = max(k, rerank_depth(stages))  # re-rankers see their top_k, whatever k is
        scores, ids = expand_and_search(x, depth, self._stage, self._rows, qe, len(self))
        return truncate(apply_rerankers(stages, x, scores, ids, shown), k)

    def encode_text(self, text: str | Sequence[str], *, rerankers: Sequence[Reranker] | None = None) -> np.ndarray:
        """The caption embeddings ``θ(t)`` ``(Q, D)`` of text queries, after checking that they
        can be searched here (a caption encoder of the database's raw dimension, no whitening or
        αDBA, no re-ranker that needs pixels; see the module docstring). A text none of whose
        words is in the vocabulary raises :class:`~imret.text.queries.NoKnownWordError`."""
        from .text.queries import NoKnownWordError, check_text_queries

        texts = check_text_queries(text)
        if self.text_encoder is None:
            raise ValueError("this Retriever has no caption encoder: give Retriever(text_encoder=CaptionEncoder "
                             "or its path) to search by text")
        dim = int(self.text_encoder.dim)
        raw = self._raw_dim if self._raw_dim is not None else (self.encoder.dim if self.encoder is not None else None)
        if raw is not None and raw != dim:
            raise ValueError(f"the caption encoder embeds text in {dim}-D, but the indexed image descriptors are "
                             f"{raw}-D; a joint model's caption encoder and image model share one dimension")
        check_text_pipeline(whitening=self.whitening, dba=self.dba,
                            rerankers=self.rerankers if rerankers is None else rerankers,
                            where="this Retriever",
                            fix="index the descriptors in a Retriever without whitening and dba to search by text")
        theta = np.asarray(self.text_encoder.encode_text(texts), dtype=np.float32)
        empty = np.flatnonzero(~np.any(theta != 0, axis=1))
        if empty.size:
            i = int(empty[0])
            raise NoKnownWordError(f"no word of text query {i} ({texts[i][:80]!r}) is in the caption model's "
                                   f"vocabulary ({getattr(self.text_encoder, 'num_terms', '?')} terms); try other words")
        return theta
