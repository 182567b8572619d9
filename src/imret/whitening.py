"""Descriptor whitening: PCA whitening and learned whitening (Lw), fitted in NumPy.

A whitening is an affine map ``y = P (x - m)`` followed by L2 normalisation, with a mean
``m`` of shape ``(C,)`` and a projection ``P`` of shape ``(D_out, C)`` whose rows are
sorted by decreasing importance, so the first ``d`` rows are the best ``d``-dimensional
whitening. Descriptors are ``(N, C)`` float32 rows in and ``(N, D_out)`` float32 rows out.

- PCA whitening (Jégou & Chum, "Negative evidences and co-occurrences in image retrieval:
  the benefit of PCA and whitening", ECCV 2012): ``P = diag(λ^-power) Eᵀ`` from the
  eigen-decomposition of the covariance of unlabelled descriptors. ``power = 0.5`` is full
  whitening, ``power = 0`` a plain PCA rotation, values in between the partial ("power")
  whitening of dirtorch (Revaud et al., ICCV 2019).
- Learned whitening Lw (Mikolajczyk & Matas, ICCV 2007; Radenović, Tolias & Chum,
  "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018, Sec. 4):
  whiten the intra-class covariance of matching pairs, then rotate by PCA of the whitened
  descriptors.

Fitting runs in float64. The fitted :class:`Whitening` stores float32 arrays (the precision
at which descriptors and :meth:`imret.models.RetrievalNet.set_whitening` use them), saves to
a pickle-free ``.npz`` and folds into a model with
``net.set_whitening(w.projection, w.mean)``.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "WHITENING_KINDS",
    "Whitening",
    "sorted_eigh",
    "fit_pca_whitening",
    "fit_learned_whitening",
    "fit_whitening",
]

WHITENING_KINDS = ("pca", "lw")

_FORMAT = "imret.whitening"
_VERSION = 1
_STATE_KEYS = ("format", "version", "kind", "params", "mean", "projection")
_NPZ_KEYS = ("mean", "projection", "meta")


def _l2_normalize(y: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(y, axis=1, keepdims=True)
    return y / np.maximum(norms, np.finfo(y.dtype).tiny)


@dataclass
class Whitening:
    """A fitted whitening ``y = normalise(P (x - m))``.

    Attributes:
        mean: ``(C,)`` float32, the mean ``m`` subtracted before projecting.
        projection: ``(D_out, C)`` float32, the matrix ``P``; rows sorted by decreasing
            importance, so ``projection[:d]`` is the best ``d``-dimensional whitening.
        kind: what produced it (``"pca"``, ``"lw"``, or a name of your own).
        params: JSON-serialisable fitting parameters, kept for the record.
    """

    mean: np.ndarray
    projection: np.ndarray
    kind: str
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        projection = _numeric_array(self.projection, "projection")
        mean = _numeric_array(self.mean, "mean")
        if projection.ndim != 2 or projection.shape[0] < 1 or projection.shape[1] < 1:
            raise ValueError(f"projection must have shape (D_out, C) with D_out, C >= 1, got {projection.shape}")
        if mean.shape != (projection.shape[1],):
            raise ValueError(
                f"mean must have shape (C,) = ({projection.shape[1]},) to match projection {projection.shape}, "
                f"got {mean.shape}"
            )
        if not (np.isfinite(projection).all() and np.isfinite(mean).all()):
            raise ValueError("whitening mean and projection must be finite (found NaN or inf)")
        if not isinstance(self.kind, str) or not self.kind:
            raise TypeError(f"kind must be a non-empty string, got {self.kind!r}")
        if not isinstance(self.params, dict):
            raise TypeError(f"params must be a dict, got {type(self.params).__name__}")
        try:
            json.dumps(self.params)
        except (TypeError, ValueError) as e:
            raise TypeError(f"params must be JSON-serialisable ({e}): {self.params!r}") from e
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.projection = np.ascontiguousarray(projection, dtype=np.float32)

    @property
    def dim(self) -> int:
        """Output dimension ``D_out``."""
        return int(self.projection.shape[0])

    @property
    def input_dim(self) -> int:
        """Input dimension ``C``."""
        return int(self.projection.shape[1])

    def apply(self, x: Any, *, normalize: bool = True) -> np.ndarray:
        """Whiten descriptors: ``(N, C) -> (N, D_out)`` float32, ``normalise((x - m) Pᵀ)``.

        With ``normalize=False`` the rows are returned before L2 normalisation. Zero rows
        stay zero.
        """
        x = _numeric_array(x, "x")
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"x must have shape (N, {self.input_dim}), got {x.shape}")
        y = (x.astype(np.float32, copy=False) - self.mean) @ self.projection.T
        if normalize:
            y = _l2_normalize(y)
        return np.ascontiguousarray(y, dtype=np.float32)

    def fold_into(self, model: Any, *, replace: bool = False) -> Any:
        """Make ``model`` output whitened descriptors: set its whitening layer to this ``P``, ``m``.

        The whitening must have been fitted on the model's own descriptors before any
        whitening, i.e. its L2-normalised pooled vectors: then the model's new output
        ``normalise(P (normalise(pool(x)) - m))`` equals ``self.apply(old output)``. That is
        why the model must L2-normalise before whitening (``spec.l2_before_whiten``).

        Args:
            model: a :class:`imret.models.RetrievalNet`; changed in place.
            replace: allow replacing an existing whitening layer. Off by default: a whitening
                fitted on an already-whitened model's output cannot be folded (there is an L2
                normalisation between the two), and replacing it silently would be wrong.

        Returns:
            ``model``, now with output dimension ``D_out``.

        Raises:
            ValueError: if ``C`` differs from the model's pooled dimension, the model does not
                normalise before whitening, or it already has a whitening and not ``replace``.
        """
        layer = getattr(model, "whiten", None)
        channels = layer.in_features if layer is not None else int(model.dim)
        if self.input_dim != channels:
            raise ValueError(
                f"whitening takes {self.input_dim}-d descriptors but the model pools {channels}-d vectors; "
                f"fit it on this model's unwhitened descriptors"
            )
        if layer is not None and not replace:
            raise ValueError(
                f"model already has a whitening layer ({layer.in_features} -> {layer.out_features}); "
                f"pass replace=True to overwrite it (fit on the model's pooled, unwhitened descriptors)"
            )
        if not model.spec.l2_before_whiten:
            raise ValueError(
                "model.spec.l2_before_whiten is False: its whitening layer sees unnormalised pooled vectors, "
                "not the L2-normalised descriptors this whitening was fitted on"
            )
        model.set_whitening(self.projection, self.mean)
        return model

    def truncated(self, dim: int) -> "Whitening":
        """The same whitening keeping the first ``dim`` output dimensions (``1 <= dim <= D_out``)."""
        dim = _check_dim(dim, self.dim, "dim")
        params = dict(self.params, truncated_from=self.dim)
        return Whitening(self.mean.copy(), self.projection[:dim].copy(), self.kind, params)

    def to_state(self) -> dict:
        """A plain dict (arrays, strings, numbers) to embed in another file; see :meth:`from_state`."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "kind": self.kind,
            "params": json.loads(json.dumps(self.params)),
            "mean": self.mean.copy(),
            "projection": self.projection.copy(),
        }

    @classmethod
    def from_state(cls, state: Mapping) -> "Whitening":
        """Rebuild from :meth:`to_state`; unknown or missing keys are errors."""
        if not isinstance(state, Mapping):
            raise TypeError(f"whitening state must be a mapping, got {type(state).__name__}")
        unknown = sorted(set(state) - set(_STATE_KEYS), key=str)
        if unknown:
            raise ValueError(f"unknown whitening state keys {unknown}; valid keys: {', '.join(_STATE_KEYS)}")
        missing = [k for k in ("kind", "mean", "projection") if k not in state]
        if missing:
            raise ValueError(f"whitening state is missing {missing}; it needs kind, mean and projection")
        fmt = state.get("format", _FORMAT)
        if fmt != _FORMAT:
            raise ValueError(f"whitening state has format {fmt!r}, expected {_FORMAT!r}")
        version = state.get("version", _VERSION)
        if version != _VERSION:
            raise ValueError(f"whitening state version {version!r} is not supported; supported: {_VERSION}")
        return cls(
            mean=np.asarray(state["mean"]),
            projection=np.asarray(state["projection"]),
            kind=state["kind"],
            params=dict(state.get("params") or {}),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` readable with ``np.load(path, allow_pickle=False)``.

        The file holds ``mean``, ``projection`` and ``meta``, a JSON string with the format,
        version, kind and params. It is written exactly at ``path`` (no suffix is added).
        """
        path = Path(path)
        meta = {"format": _FORMAT, "version": _VERSION, "kind": self.kind, "params": self.params}
        with open(path, "wb") as f:
            np.savez(f, mean=self.mean, projection=self.projection, meta=np.array(json.dumps(meta)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Whitening":
        """Read a file written by :meth:`save` (never unpickles anything)."""
        path = Path(path)
        try:
            z = np.load(path, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            with z:
                missing = [k for k in _NPZ_KEYS if k not in z.files]
                if missing:
                    raise ValueError(f"missing arrays {missing} (found {z.files}); expected {', '.join(_NPZ_KEYS)}")
                mean, projection = z["mean"], z["projection"]
                meta_arr = z["meta"]
                if meta_arr.dtype.kind != "U" or meta_arr.ndim != 0:
                    raise ValueError(f"meta must be a JSON string, got {meta_arr.dtype} of shape {meta_arr.shape}")
                meta = json.loads(meta_arr.item())
        except FileNotFoundError:
            raise
        except (ValueError, OSError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not an imret whitening file ({e})") from e
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: meta is {type(meta).__name__}, expected a JSON object")
        try:
            return cls.from_state({**meta, "mean": mean, "projection": projection})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e


# --------------------------------------------------------------------------- validation


def _numeric_array(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    return a


def _training_matrix(x: Any, name: str = "x") -> np.ndarray:
    a = _numeric_array(x, name)
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"{name} must be descriptors of shape (N, C), got shape {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 descriptors to fit a whitening, got {a.shape[0]}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a.astype(np.float64)


def _check_dim(dim: Any, limit: int, name: str = "dim") -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"{name} must be an integer or None, got {dim!r}")
    if not 1 <= dim <= limit:
        raise ValueError(f"{name} must be in [1, {limit}], got {dim}")
    return int(dim)


def _check_nonneg(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


def _check_pairs(pairs: Any, n: int) -> np.ndarray:
    p = np.asarray(pairs)
    if p.size == 0:
        raise ValueError("pairs is empty; Lw needs at least one matching pair (query index, positive index)")
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"pairs must have shape (P, 2) of (query index, positive index), got {p.shape}")
    if p.dtype.kind not in "iu":
        raise TypeError(f"pairs must be integer indices, got dtype {p.dtype}")
    bad = (p < 0) | (p >= n)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"pairs[{r}, {c}] = {p[r, c]} is out of range for {n} descriptors (valid: 0..{n - 1})")
    return p.astype(np.int64)


# --------------------------------------------------------------------------- linear algebra


def sorted_eigh(cov: Any) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric matrix, eigenvalues in decreasing order.

    Uses ``np.linalg.eigh`` (real eigenvalues, orthonormal eigenvectors even for repeated
    eigenvalues), never the general ``eig``. Signs are fixed so that the entry of largest
    magnitude of each eigenvector is positive, which makes fitting deterministic.

    Args:
        cov: ``(C, C)`` symmetric matrix (symmetrised as ``(A + Aᵀ) / 2`` after a check).

    Returns:
        ``(eigenvalues (C,), eigenvectors (C, C))`` in float64, eigenvector ``i`` in
        column ``i``, ``cov = E diag(λ) Eᵀ``.
    """
    a = _numeric_array(cov, "cov").astype(np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
        raise ValueError(f"cov must be a square (C, C) matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("cov contains NaN or inf")
    scale = max(float(np.abs(a).max()), np.finfo(np.float64).tiny)
    asym = float(np.abs(a - a.T).max())
    if asym > 1e-8 * scale:
        raise ValueError(f"cov must be symmetric; max |A - Aᵀ| = {asym:.3g} (max |A| = {scale:.3g})")
    lam, vecs = np.linalg.eigh((a + a.T) / 2)
    order = np.argsort(lam)[::-1]
    lam, vecs = lam[order], vecs[:, order]
    pivot = np.abs(vecs).argmax(axis=0)
    signs = np.sign(vecs[pivot, np.arange(vecs.shape[1])])
    signs[signs == 0] = 1.0
    return lam, vecs * signs


# --------------------------------------------------------------------------- fitting


def fit_pca_whitening(x: Any, dim: int | None = None, *, power: float = 0.5, eps: float = 1e-6) -> Whitening:
    """PCA whitening of unlabelled descriptors (Jégou & Chum, ECCV 2012).

    With ``m`` the mean of ``x``, ``Σ = (1/N) Σ_i (x_i - m)(x_i - m)ᵀ = E diag(λ) Eᵀ``
    (eigenvalues decreasing), the projection is ``P = diag((λ + ε)^-power) Eᵀ`` truncated to
    the first ``dim`` rows. ``power = 0.5`` gives whitened training data with identity
    covariance, ``power = 0`` an orthogonal PCA rotation (``P Pᵀ = I``), values in between
    the partial whitening of dirtorch.

    Regularisation: ``ε = eps * mean(λ)`` (relative to the average variance, so the result
    does not depend on the scale of ``x``) is added to every eigenvalue, bounding the gain of
    weak components by ``(eps * mean(λ))^-power``.

    Rank deficiency: with fewer descriptors than dimensions (``N <= C``) the covariance has
    rank ``r <= N - 1``; the remaining directions carry no training variance and whitening
    them would only amplify noise. The numerical rank ``r`` counts eigenvalues above
    ``max(N, C) * float64_eps * λ_max``. ``dim=None`` keeps ``min(C, r)`` components, and
    ``dim > r`` with ``power > 0`` is an error (with ``power = 0`` any ``dim <= C`` is allowed:
    a rotation cannot blow up).

    Args:
        x: ``(N, C)`` training descriptors, ``N >= 2``.
        dim: output dimension ``D_out``; ``None`` for the rank of the data.
        power: exponent of the eigenvalues, ``>= 0``.
        eps: relative ridge added to the eigenvalues, ``>= 0``.

    Returns:
        A :class:`Whitening` with ``kind="pca"`` and ``projection`` of shape ``(D_out, C)``.
    """
    X = _training_matrix(x)
    n, c = X.shape
    power = _check_nonneg(power, "power")
    eps = _check_nonneg(eps, "eps")
    m = X.mean(axis=0)
    Xc = X - m
    lam, vecs = sorted_eigh(Xc.T @ Xc / n)
    lam = np.clip(lam, 0.0, None)  # round-off can make null eigenvalues slightly negative
    if lam[0] <= 0:
        raise ValueError("x has zero variance (all descriptors are identical); cannot fit a PCA whitening")
    rank = int((lam > max(n, c) * np.finfo(np.float64).eps * lam[0]).sum())
    if dim is None:
        dim = rank
    dim = _check_dim(dim, c)
    if power > 0 and dim > rank:
        raise ValueError(
            f"dim={dim} exceeds the rank {rank} of the training covariance (N={n}, C={c}); components beyond "
            f"the rank have zero variance and cannot be whitened: pass dim <= {rank}, more descriptors, or power=0"
        )
    gain = (lam[:dim] + eps * lam.mean()) ** -power
    projection = gain[:, None] * vecs[:, :dim].T
    params = {"power": power, "eps": eps, "n_train": n, "rank": rank}
    return Whitening(mean=m, projection=projection, kind="pca", params=params)


def fit_learned_whitening(x: Any, pairs: Any, dim: int | None = None, *, eps: float = 1e-6) -> Whitening:
    """Learned whitening Lw from matching pairs (Radenović et al., TPAMI 2018, Sec. 4).

    Following Mikolajczyk & Matas (ICCV 2007) as used in the GeM paper and its code
    (cirtorch ``whitenlearn``):

    1. ``m`` = mean of the query side ``x[pairs[:, 0]]``.
    2. Intra-class covariance ``C_S = (1/P) Σ_(i,j) (x_i - x_j)(x_i - x_j)ᵀ`` over the
       matching pairs, plus a ridge ``ε I`` with ``ε = eps * trace(C_S) / C``.
    3. Whitening part ``P_1 = L⁻¹`` with ``C_S = L Lᵀ`` (Cholesky, as in the paper's code), so
       that ``P_1 C_S P_1ᵀ = I``. The symmetric ``C_S^(-1/2)`` whitens ``C_S`` equally well;
       the two differ by an orthogonal matrix, which step 4 absorbs, so the final whitening
       is the same up to signs of its rows.
    4. Rotation: eigenvectors ``E`` (eigenvalues decreasing) of the covariance of the
       whitened descriptors ``(1/N) Σ_i P_1 (x_i - m)(x_i - m)ᵀ P_1ᵀ`` over all rows of
       ``x``, exactly as the paper's code does (it stands in for the inter-class
       covariance ``C_D`` of the paper's equation).
    5. ``P = Eᵀ P_1`` truncated to the first ``dim`` rows.

    Regularisation: the ridge of step 2 keeps ``C_S`` positive definite when it is singular
    (fewer pairs than dimensions, or duplicated descriptors). ``eps=0`` turns it off, and a
    singular ``C_S`` is then an error.

    Args:
        x: ``(N, C)`` training descriptors.
        pairs: ``(P, 2)`` integer indices into ``x`` of matching pairs
            ``(query index, positive index)``, ``P >= 1``.
        dim: output dimension ``D_out`` (default ``C``).
        eps: relative ridge added to ``C_S``, ``>= 0``.

    Returns:
        A :class:`Whitening` with ``kind="lw"`` and ``projection`` of shape ``(D_out, C)``.
    """
    X = _training_matrix(x)
    n, c = X.shape
    p = _check_pairs(pairs, n)
    eps = _check_nonneg(eps, "eps")
    dim = c if dim is None else _check_dim(dim, c)
    queries = X[p[:, 0]]
    m = queries.mean(axis=0)
    diff = queries - X[p[:, 1]]
    cs = diff.T @ diff / len(p)
    cs = (cs + cs.T) / 2
    avg = float(np.trace(cs)) / c
    if avg <= 0:
        raise ValueError("all matching pairs have identical descriptors: the intra-class covariance is zero")
    try:
        chol = np.linalg.cholesky(cs + eps * avg * np.eye(c))
    except np.linalg.LinAlgError as e:
        raise ValueError(
            f"the intra-class covariance of the {len(p)} matching pairs is singular (C={c}); "
            f"use eps > 0 (got eps={eps}) or more pairs"
        ) from e
    p1 = np.linalg.solve(chol, np.eye(c))  # L⁻¹, lower triangular
    z = (X - m) @ p1.T
    _, vecs = sorted_eigh(z.T @ z / n)
    projection = vecs[:, :dim].T @ p1
    params = {"eps": eps, "n_train": n, "n_pairs": int(len(p))}
    return Whitening(mean=m, projection=projection, kind="lw", params=params)


def fit_whitening(
    x: Any, kind: str = "pca", *, pairs: Any = None, dim: int | None = None, **options: Any
) -> Whitening:
    """Fit a whitening selected by name.

    Args:
        x: ``(N, C)`` training descriptors.
        kind: ``"pca"`` (:func:`fit_pca_whitening`; options ``power``, ``eps``) or
            ``"lw"`` (:func:`fit_learned_whitening`; needs ``pairs``; option ``eps``).
        pairs: ``(P, 2)`` matching pairs, for ``"lw"`` only.
        dim: output dimension.
    """
    if kind == "pca":
        if pairs is not None:
            raise ValueError("pairs are used only by kind='lw'; PCA whitening is unsupervised")
        return fit_pca_whitening(x, dim, **options)
    if kind == "lw":
        if pairs is None:
            raise ValueError("kind='lw' needs pairs: a (P, 2) array of (query index, positive index)")
        return fit_learned_whitening(x, pairs, dim, **options)
    raise ValueError(f"unknown whitening kind {kind!r}; available: {', '.join(WHITENING_KINDS)}")
