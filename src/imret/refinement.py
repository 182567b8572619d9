"""Training-free refinement of global descriptors and of their ranking (SuperGlobal).

Shao et al., "Global Features are All You Need for Image Retrieval and Reranking", ICCV 2023
(official code: github.com/ShihaoShao-GH/SuperGlobal, read for the formulas and defaults;
this is a separate implementation). Two parts:

Extraction side, switched on by a :class:`Refinement` given to :func:`imret.extract.extract`
(each part off by default; the model's weights are never changed):

- GeM+ (``gem_p``): GeM pooling with a fixed, larger exponent instead of the learned one
  (paper and code: p = 4.6, ``modules/coarse_retrieval/gemp.py`` line 12).
- regional GeM (``regional=(p, size)``): before the global pooling, every cell of the map
  is averaged with the local GeM (exponent p) of the ``size x size`` window around it, the
  map reflection-padded so that every window is whole (:func:`regional_gem_map`; code:
  p = 2.5, size = 5, ``modules/coarse_retrieval/rgem.py`` lines 12-21).
- scale GeM with p -> inf (``scale_max``): the per-scale descriptors, each L2-normalised,
  combined by their element-wise maximum instead of the power mean (:func:`combine_scales_max`;
  ``modules/coarse_retrieval/sgem.py`` lines 12, 20-22, ``infinity=True``). The paper's
  scales are ``(2**-0.5, 1, 2**0.5)`` (``model/resnet.py`` line 275): :data:`SUPERGLOBAL_SCALES`.
- ReLU-shift (``relup``): inside a ResNet trunk the ReLUs after the residual blocks of every
  stage but the last, and the inner ReLUs of the first stage's bottlenecks, become
  ``max(x, alpha)`` (alpha = 0.014, ``model/resnet.py`` lines 120-129 and 153-166).

Ranking side, :class:`TopMRefiner` (a :class:`imret.retrieval.Reranker`): the code's
``MDescAug`` + ``RerankwMDA`` (``modules/reranking/``) on each query's top M results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .models.heads import GlobalHead
from .models.pooling import GeM, gem

__all__ = [
    "GEM_PLUS_P",
    "REGIONAL_P",
    "REGIONAL_SIZE",
    "RELUP_ALPHA",
    "SUPERGLOBAL_SCALES",
    "regional_gem_map",
    "combine_scales_max",
    "relup",
    "Refinement",
    "check_refinement",
    "refined_descriptors",
    "refined_power",
    "relup_hooks",
    "top_m_scores",
    "TopMRefiner",
]

GEM_PLUS_P = 4.6
"""GeM+ exponent (SuperGlobal ``modules/coarse_retrieval/gemp.py`` line 12)."""
REGIONAL_P = 2.5
"""Exponent of the local GeM of regional GeM (``modules/coarse_retrieval/rgem.py`` line 12)."""
REGIONAL_SIZE = 5
"""Window side of regional GeM, in feature-map cells (``rgem.py`` line 12)."""
RELUP_ALPHA = 0.014
"""ReLU-shift floor (``model/resnet.py`` lines 121, 127, 154)."""
SUPERGLOBAL_SCALES = (2 ** -0.5, 1.0, 2 ** 0.5)
"""The paper's three test scales (``model/resnet.py`` line 275: 0.7071, 1, 1.4142)."""


# --- pure functions ------------------------------------------------------------------------------


def _check_odd_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
        raise ValueError(f"regional GeM window size must be an odd integer >= 1 (1, 3, 5, ...), got {size!r}")
    return int(size)


def _check_positive(value: Any, name: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def regional_gem_map(x: torch.Tensor, p: float = REGIONAL_P, size: int = REGIONAL_SIZE,
                     eps: float = 1e-6) -> torch.Tensor:
    """Regional GeM of SuperGlobal: ``(B, C, H, W) -> (B, C, H, W)``,
    ``y = x / 2 + (mean_{window} max(x, eps)^p)^(1/p) / 2``.

    The window is the ``size x size`` neighbourhood of each cell on the reflection-padded map
    (so it always holds ``size**2`` values), the code's ``LPPool2d(p, size, stride=1)`` of
    the padded map divided by ``(size**2)^(1/p)``. Activations are clamped at ``eps`` as GeM
    does (the code clamps nothing: its maps are post-ReLU, where this changes nothing above
    eps). Reflection needs a pad smaller than the map side, so on a map smaller than the
    window the window shrinks along that side to ``2 * side - 1`` (a 1-cell side: no pooling).
    """
    if x.dim() != 4:
        raise ValueError(f"expected a feature map of shape (B, C, H, W), got shape {tuple(x.shape)}")
    p = _check_positive(p, "regional GeM p")
    size = _check_odd_size(size)
    half = (size - 1) // 2
    ph, pw = min(half, x.shape[-2] - 1), min(half, x.shape[-1] - 1)
    xp = x.clamp(min=eps).pow(p)
    if ph or pw:
        xp = F.pad(xp, (pw, pw, ph, ph), mode="reflect")
    local = F.avg_pool2d(xp, (2 * ph + 1, 2 * pw + 1), stride=1).pow(1.0 / p)
    return 0.5 * local + 0.5 * x


def combine_scales_max(descs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Scale GeM with p -> inf: ``S x (B, D) -> (B, D)``, ``normalise(max_s normalise(v_s))``
    (element-wise maximum of the L2-normalised per-scale descriptors; SuperGlobal's ``sgem``
    with ``infinity=True``; the final normalisation is the code's ``extract_feature``)."""
    if len(descs) == 0:
        raise ValueError("combine_scales_max needs at least one descriptor per scale, got none")
    stack = torch.stack([F.normalize(d.float(), dim=1) for d in descs])
    return F.normalize(stack.amax(0), dim=1)


def relup(x: torch.Tensor, alpha: float = RELUP_ALPHA) -> torch.Tensor:
    """ReLU-shift: ``max(x, alpha)`` (SuperGlobal's ``relup``; alpha = 0 is ReLU)."""
    return x.clamp(min=alpha)


# --- the extraction-side switches --------------------------------------------------------------


@dataclass(frozen=True)
class Refinement:
    """Test-time changes to how a model's descriptors are made (all off by default).

    Attributes:
        gem_p: GeM+: pool with this fixed exponent instead of the learned one (paper: 4.6,
            :data:`GEM_PLUS_P`); the multi-scale power mean then uses it too. Needs the
            global head with GeM pooling.
        regional: ``(p, size)``: regional GeM on the final map before the pooling
            (:func:`regional_gem_map`; paper: ``(2.5, 5)``). Needs the global head.
        scale_max: combine scales by the element-wise max of the normalised per-scale
            descriptors (:func:`combine_scales_max`) instead of the power mean.
        relup: ReLU-shift floor alpha in a ResNet trunk (paper: 0.014, :data:`RELUP_ALPHA`);
            see :func:`relup_hooks`. Only :func:`imret.extract.extract` applies it.

    ``Refinement.superglobal()`` has the paper's four settings; use it with
    :data:`SUPERGLOBAL_SCALES`. Saved with :meth:`to_dict`, read back with :meth:`from_dict`.
    """

    gem_p: float | None = None
    regional: tuple[float, int] | None = None
    scale_max: bool = False
    relup: float | None = None

    def __post_init__(self) -> None:
        if self.gem_p is not None:
            object.__setattr__(self, "gem_p", _check_positive(self.gem_p, "gem_p"))
        if self.regional is not None:
            if not isinstance(self.regional, (tuple, list)) or len(self.regional) != 2:
                raise ValueError(f"regional must be None or a pair (p, size), e.g. (2.5, 5), got {self.regional!r}")
            p, size = self.regional
            object.__setattr__(self, "regional", (_check_positive(p, "regional p"), _check_odd_size(size)))
        if not isinstance(self.scale_max, (bool, np.bool_)):
            raise ValueError(f"scale_max must be True or False, got {self.scale_max!r}")
        object.__setattr__(self, "scale_max", bool(self.scale_max))
        if self.relup is not None:
            a = self.relup
            if (isinstance(a, bool) or not isinstance(a, (int, float, np.integer, np.floating))
                    or not math.isfinite(a) or a < 0):
                raise ValueError(f"relup must be None or a finite number >= 0, got {a!r}")
            object.__setattr__(self, "relup", float(a))

    @classmethod
    def parse(cls, text: str) -> "Refinement":
        """From a command-line string: ``superglobal`` (all four, the paper's values), ``none``,
        or a comma list of ``gem+[=P]``, ``rgem[=P:SIZE]``, ``smax``, ``relup[=ALPHA]``
        (each without a value takes the paper's)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("refinement must be 'superglobal', 'none' or a list such as 'gem+,rgem,smax'")
        t = text.strip().lower()
        if t == "superglobal":
            return cls.superglobal()
        if t == "none":
            return cls()
        kw: dict[str, Any] = {}
        for item in t.split(","):
            name, eq, value = item.strip().partition("=")
            try:
                if name == "gem+":
                    kw["gem_p"] = float(value) if eq else GEM_PLUS_P
                elif name == "rgem":
                    p, _, size = value.partition(":")
                    kw["regional"] = (float(p) if p else REGIONAL_P, int(size) if size else REGIONAL_SIZE)
                elif name == "smax" and not eq:
                    kw["scale_max"] = True
                elif name == "relup":
                    kw["relup"] = float(value) if eq else RELUP_ALPHA
                else:
                    raise KeyError(name)
            except KeyError:
                raise ValueError(f"unknown refinement {item.strip()!r} in {text!r}; available: superglobal, none, "
                                 "gem+[=P], rgem[=P:SIZE], smax, relup[=ALPHA]") from None
            except ValueError:
                raise ValueError(f"bad value in refinement {item.strip()!r} (in {text!r}); e.g. gem+=4.6, rgem=2.5:5, "
                                 "relup=0.014") from None
        return cls(**kw)

    @classmethod
    def superglobal(cls) -> "Refinement":
        """The paper's settings: GeM+ p = 4.6, regional GeM (2.5, 5), scale max, ReLU-shift 0.014."""
        return cls(gem_p=GEM_PLUS_P, regional=(REGIONAL_P, REGIONAL_SIZE), scale_max=True, relup=RELUP_ALPHA)

    @property
    def active(self) -> bool:
        """Whether any switch is on (``Refinement()`` leaves extraction exactly as without it)."""
        return self.gem_p is not None or self.regional is not None or self.scale_max or self.relup is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``regional`` as a list); :meth:`from_dict` reads it back."""
        return {"gem_p": self.gem_p, "regional": None if self.regional is None else list(self.regional),
                "scale_max": self.scale_max, "relup": self.relup}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Refinement":
        """From a saved dict; missing keys take their defaults, unknown keys are refused."""
        if not isinstance(d, dict):
            raise ValueError(f"refinement must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in refinement; valid: {sorted(names)}")
        d = dict(d)
        if isinstance(d.get("regional"), list):
            d["regional"] = tuple(d["regional"])
        return cls(**d)


def check_refinement(model: Any, refinement: Refinement | None) -> Refinement | None:
    """``refinement`` checked against ``model`` (a :class:`~imret.models.net.RetrievalNet`):
    None when it is None or switches nothing on; raises ``ValueError`` naming what the model
    lacks (GeM+ and regional GeM need the global head, GeM+ its GeM pooling; ReLU-shift a
    ResNet trunk)."""
    if refinement is None:
        return None
    if not isinstance(refinement, Refinement):
        raise TypeError(f"refinement must be an imret.refinement.Refinement or None, got {type(refinement).__name__}")
    if not refinement.active:
        return None
    head = getattr(model, "head", None)
    if (refinement.gem_p is not None or refinement.regional is not None) and not isinstance(head, GlobalHead):
        raise ValueError(f"GeM+ (gem_p) and regional GeM need the 'global' head; this model's head is "
                         f"{type(head).__name__}: use scale_max / relup only, or a global-head model")
    if refinement.gem_p is not None and not isinstance(head.pool, GeM):
        raise ValueError(f"GeM+ (gem_p={refinement.gem_p}) replaces a GeM pooling's p; this model pools with "
                         f"{type(head.pool).__name__}: use a 'gem' model or leave gem_p=None")
    if refinement.relup is not None:
        _relup_targets(model)  # raises for trunks other than ResNets
    return refinement


def refined_descriptors(model: Any, x: torch.Tensor, refinement: Refinement) -> torch.Tensor:
    """``(B, 3, H, W) -> (B, D)`` descriptors of one scale with ``refinement``'s pooling
    switches (GeM+, regional GeM); the rest as the model's head does it. ReLU-shift and the
    scale combination are not applied here (see :func:`relup_hooks`, :func:`combine_scales_max`)."""
    if refinement.gem_p is None and refinement.regional is None:
        return model(x)
    head = model.head
    fmap = model.feature_maps(x)[-1].float()
    if refinement.regional is not None:
        p, size = refinement.regional
        fmap = regional_gem_map(fmap, p, size, eps=getattr(head.pool, "eps", 1e-6))
    v = gem(fmap, refinement.gem_p, head.pool.eps) if refinement.gem_p is not None else head.pool(fmap)
    return head.describe_pooled(v)


def refined_power(model: Any, refinement: Refinement | None) -> float:
    """Exponent of the multi-scale power mean: ``gem_p`` for GeM+ on a head whose descriptors
    are power-averaged (GeM without whitening), else ``model.multiscale_power()``."""
    power = model.multiscale_power()
    if refinement is not None and refinement.gem_p is not None and power != 1.0:
        return refinement.gem_p
    return power


def _relup_targets(model: Any) -> list[torch.nn.Module]:
    trunk = getattr(model, "trunk", model)
    stages = []
    while hasattr(trunk, f"layer{len(stages) + 1}"):
        stages.append(getattr(trunk, f"layer{len(stages) + 1}"))
    if len(stages) < 2:
        raise ValueError(f"ReLU-shift (relup) needs a ResNet trunk (timm resnet* / resnext*, stages layer1..layer4); "
                         f"this trunk is {type(trunk).__name__}: leave relup=None")
    targets = []
    for i, stage in enumerate(stages[:-1]):
        for block in stage.children():
            acts = [getattr(block, a) for a in ("act1", "act2", "act3") if getattr(block, a, None) is not None]
            if not acts:
                raise ValueError(f"ReLU-shift (relup): block {type(block).__name__} of layer{i + 1} has no "
                                 "act1/act2/act3 activations; leave relup=None")
            bottleneck = getattr(block, "act3", None) is not None
            targets.extend(acts if (i == 0 and bottleneck) else acts[-1:])
    return targets


@contextlib.contextmanager
def relup_hooks(model: Any, alpha: float = RELUP_ALPHA) -> Iterator[None]:
    """Within the block, ReLU-shift the model's ResNet trunk: the output activation of every
    residual block in all stages but the last, and the inner activations of the first stage's
    bottleneck blocks, return ``max(x, alpha)`` (SuperGlobal ``model/resnet.py``: ``relup``
    in ``ResBlock`` for stages of width != 2048 and in ``BottleneckTransform`` for width 256).

    Done with forward hooks, removed on exit; the weights are not touched, but the model is
    changed for every caller while the block runs (do not share it between threads then).
    """
    alpha = float(alpha)
    handles = [m.register_forward_hook(lambda _m, _i, out: out.clamp(min=alpha)) for m in _relup_targets(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --- the ranking side: top-M descriptor refinement and query expansion -------------------------

RowsFn = Callable[[np.ndarray], np.ndarray]

# Float32 elements of one scratch array per chunk of queries (similarity block or rows): 64 MiB.
_CHUNK_ELEMENTS = 1 << 24


def top_m_scores(x: np.ndarray, db: np.ndarray, valid: np.ndarray, k: int = 9,
                 beta: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """SuperGlobal's re-ranking scores of each query's top M candidates.

    For query ``q`` with candidate rows ``d_1..d_M``:

    1. each candidate is refined with its ``k`` nearest other candidates ``N_k(i)`` (by
       ``s_ij = d_iᵀ d_j``, the candidate itself excluded by position):
       ``d'_i = (d_i + Σ_{j ∈ N_k(i)} β max(s_ij, 0) d_j) / (1 + Σ_{j ∈ N_k(i)} β max(s_ij, 0))``
       (``MDescAug``: weight 1 for the first of its ``k + 1`` neighbours, which is the row
       itself for unit rows, ``β s_ij`` for the others; a weighted mean, not normalised);
    2. ``r_i = qᵀ d'_i`` ranks the refined candidates;
    3. the query expansion is the element-wise maximum ``q_e = max_{t ∈ T} d'_t`` over the
       ``k + 1`` candidates ``T`` of highest ``r`` (``RerankwMDA``; q itself not included);
    4. the final score is ``(qᵀ d'_i + q_eᵀ d'_i) / 2``.

    Deviation from the code: neighbour weights use ``max(s_ij, 0)`` (the code uses ``s_ij``,
    which can make the denominator vanish when neighbours point away); identical whenever
    the neighbours' similarities are >= 0, as among a query's top results they are.

    Args:
        x: ``(Q, D)`` query rows.
        db: ``(Q, M, D)`` candidate rows (anything for invalid ones).
        valid: ``(Q, M)`` bool, False for padding (those score ``-inf`` and are nobody's neighbour).
        k: neighbours per candidate, and ``k + 1`` expansion rows; fewer when fewer valid
            candidates exist.
        beta: weight factor of the neighbours.

    Returns:
        ``(r, final)``, both ``(Q, M)`` float32 aligned with ``db``, ``-inf`` where not valid.
    """
    x = np.asarray(x, np.float32)
    db = np.asarray(db, np.float32)
    valid = np.asarray(valid, bool)
    q, m = valid.shape
    db = np.where(valid[..., None], db, 0.0).astype(np.float32)
    sims = np.matmul(db, db.transpose(0, 2, 1))  # (Q, M, M)
    pair = valid[:, :, None] & valid[:, None, :]
    pair[:, np.arange(m), np.arange(m)] = False
    sims = np.where(pair, sims, -np.inf)
    kk = min(int(k), m - 1)
    qi = np.arange(q)[:, None, None]
    if kk > 0:
        nn = np.argpartition(-sims, kk - 1, axis=2)[..., :kk]  # (Q, M, kk), unordered
        ns = np.take_along_axis(sims, nn, axis=2)
        w = np.where(np.isfinite(ns), np.float32(beta) * np.maximum(ns, 0.0), 0.0).astype(np.float32)
    else:
        nn = np.zeros((q, m, 0), np.int64)
        w = np.zeros((q, m, 0), np.float32)
    den = 1.0 + w.sum(-1)  # (Q, M)

    def refined(s: np.ndarray) -> np.ndarray:  # qᵀ d'_i from qᵀ d_j, (Q, M) -> (Q, M)
        return (s + (w * s[qi, nn]).sum(-1)) / den

    r = np.where(valid, refined(np.matmul(db, x[:, :, None])[..., 0]), -np.inf)
    kt = min(int(k) + 1, m)
    top = np.argsort(-r, axis=1, kind="stable")[:, :kt]  # (Q, kt)
    qt = np.arange(q)[:, None]
    top_valid = valid[qt, top]
    nn_top, w_top = nn[qt, top], w[qt, top]  # (Q, kt, kk)
    d_top = (db[qt, top] + np.einsum("qtj,qtjd->qtd", w_top, db[qt[..., None], nn_top])) / den[qt, top][..., None]
    qe = np.where(top_valid[..., None], d_top, -np.inf).max(axis=1)
    qe = np.where(np.isfinite(qe), qe, 0.0).astype(np.float32)  # a query without candidates
    r2 = refined(np.matmul(db, qe[:, :, None])[..., 0])
    final = np.where(valid, (r + r2) / 2.0, -np.inf)
    return r.astype(np.float32), final.astype(np.float32)


class TopMRefiner:
    """SuperGlobal re-ranking of each query's top ``m`` results (a
    :class:`~imret.retrieval.Reranker`; Shao et al., ICCV 2023, ``MDescAug`` + ``RerankwMDA``).

    The top ``m`` candidates are refined with their nearest neighbours among themselves, the
    query is expanded with the refined top ``k + 1`` and the ``m`` are re-scored and re-ordered
    (:func:`top_m_scores`); the ordering ties as the code's (candidates first sorted by the
    refined similarity, then stably by the final score).

    Scores: the top block gets the final scores ``(qᵀ d' + q_eᵀ d') / 2`` (not cosines: ``d'``
    is a weighted mean and ``q_e`` an element-wise max, neither normalised). Results past ``m``
    keep their ids and order; their scores stay as given when they already lie below the
    block's lowest score, otherwise all are shifted down by one constant so that the first is
    just (one float32 step) below it. Each row stays decreasing.

    Args:
        rows: ``rows(ids (Q, m)) -> (Q, m, D')`` stored database rows (zeros for ``-1``),
            as :func:`imret.retrieval.rescore` takes; rows L2-normalised.
        m: how many top results to refine (paper 400: ``MDescAug.py`` / ``RerankwMDA.py`` line 12);
            a query with fewer results refines all it has.
        k: neighbours per candidate and ``k + 1`` expansion rows (paper 9, same lines; the
            code's ``K + 1`` counts the row itself); ``0 <= k < m``.
        beta: neighbour weight factor (paper 0.15, same lines).
        chunk_size: queries per step (default: about 64 MiB of float32 scratch per array).
    """

    def __init__(self, rows: RowsFn, m: int = 400, k: int = 9, beta: float = 0.15, *,
                 chunk_size: int | None = None) -> None:
        if not callable(rows):
            raise TypeError(f"rows must be a callable ids (Q, m) -> rows (Q, m, D'), got {type(rows).__name__}")
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"m must be a positive integer (paper: 400), got {m!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be an integer >= 0 (paper: 9), got {k!r}")
        if k >= m:
            raise ValueError(f"k must be smaller than m (each of the top m has at most m - 1 other "
                             f"candidates as neighbours), got k={k}, m={m}: use k <= {m - 1} or a larger m")
        if (isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating))
                or not math.isfinite(beta) or beta < 0):
            raise ValueError(f"beta must be a finite number >= 0 (paper: 0.15), got {beta!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.rows, self.m, self.k, self.beta, self.chunk_size = rows, int(m), int(k), float(beta), chunk_size

    def __repr__(self) -> str:
        return f"TopMRefiner(m={self.m}, k={self.k}, beta={self.beta})"

    def rerank(self, x: np.ndarray, scores: np.ndarray, ids: np.ndarray,
               images: Sequence[tuple[Any, Any]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``x`` ``(Q, D')`` query rows, ``scores`` / ``ids`` ``(Q, k)`` (padded ``-inf`` / ``-1``)
        -> new ``(scores, ids)`` of the same shape; ``images`` is not used."""
        x = np.asarray(x, np.float32)
        scores = np.asarray(scores, np.float32)
        ids = np.asarray(ids, np.int64)
        if ids.ndim != 2 or scores.shape != ids.shape:
            raise ValueError(f"scores and ids must both be (Q, k), got {scores.shape} and {ids.shape}")
        if x.ndim != 2 or x.shape[0] != ids.shape[0]:
            raise ValueError(f"x must be (Q, D') with Q = {ids.shape[0]} queries, got shape {x.shape}")
        q, width = ids.shape
        m = min(self.m, width)
        if q == 0 or m == 0:
            return scores.copy(), ids.copy()
        out_s, out_i = scores.copy(), ids.copy()
        chunk = self.chunk_size or max(1, _CHUNK_ELEMENTS // max(m * m, m * x.shape[1]))
        for start in range(0, q, chunk):
            sl = slice(start, min(start + chunk, q))
            top = ids[sl, :m]
            db = np.asarray(self.rows(top), np.float32)
            if db.shape != top.shape + (x.shape[1],):
                raise ValueError(f"rows(ids) must return {top.shape + (x.shape[1],)} rows, got {db.shape}")
            valid = top >= 0
            r, final = top_m_scores(x[sl], db, valid, self.k, self.beta)
            first = np.argsort(-r, axis=1, kind="stable")
            then = np.argsort(-np.take_along_axis(final, first, 1), axis=1, kind="stable")
            order = np.take_along_axis(first, then, 1)
            block = np.take_along_axis(final, order, 1)
            out_i[sl, :m] = np.take_along_axis(top, order, 1)
            out_s[sl, :m] = block
            if width > m:
                out_s[sl, m:] = _below(block, scores[sl, m:])
        # a stable sort puts valid results past m above padding left in the block (padding
        # is normally trailing, and then this changes nothing)
        order = np.argsort(-out_s, axis=1, kind="stable")
        return np.take_along_axis(out_s, order, 1), np.take_along_axis(out_i, order, 1)


def _below(block: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """``tail`` ``(c, t)`` (decreasing rows) shifted down per row, when needed, so that it
    lies strictly below the lowest finite score of ``block`` ``(c, m)``."""
    finite_block = np.where(np.isfinite(block), block, np.inf)
    low = finite_block.min(axis=1)  # inf: no valid block score
    finite_tail = np.where(np.isfinite(tail), tail, -np.inf)
    high = finite_tail.max(axis=1)
    shift = np.where(np.isfinite(low) & np.isfinite(high) & (high >= low), low.astype(np.float64) - high, 0.0)
    out = (tail.astype(np.float64) + shift[:, None]).astype(np.float32)
    ceiling = np.where(np.isfinite(low), np.nextafter(low.astype(np.float32), np.float32(-np.inf)), np.inf)
    return np.minimum(out, ceiling[:, None].astype(np.float32))
