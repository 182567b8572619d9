"""Caption encoder of Gordo & Larlus (CVPR 2017): tf-idf of a caption, projected and L2-normalised.

"Beyond instance-level image retrieval: leveraging captions to learn a global visual
representation for semantic retrieval" represents a text ``t`` by its tf-idf vector and embeds it
in the visual space with a learned matrix ``W`` (vocabulary × D)::

    θ(t) = Wᵀ t / ‖Wᵀ t‖

The same tf-idf vectors, with all captions of an image taken together, give the *semantic
relevance* between two images: the cosine similarity of their caption tf-idf vectors
(:meth:`CaptionEncoder.transform_images`, :func:`tfidf_similarity`); the paper shows this
surrogate agrees well with human rankings and trains and evaluates with it.

Text processing (:class:`CaptionTokenizer`): lower-case, split into runs of letters and digits,
drop tokens shorter than 2 characters and scikit-learn's English stop words, then NLTK's Snowball
English stemmer (pure Python, no data download). tf-idf as scikit-learn's ``TfidfVectorizer``
computes it: ``tf · idf`` with ``idf = ln((1 + n) / (1 + df)) + 1`` (``smooth_idf``), rows
L2-normalised. Defaults, and why:

* ``sublinear_tf=True`` (``tf → 1 + ln tf``): an image's document is its five captions together,
  in which the main object is named up to five times; sublinear tf keeps it from swamping the
  other words. For one caption it changes almost nothing (words rarely repeat).
* ``min_df=2``: a word seen in a single training caption (mostly typos) cannot generalise and
  only adds a row to ``W``.

Only :meth:`CaptionEncoder.fit` needs scikit-learn; transforming and encoding use NLTK, SciPy
and torch. Heavy imports happen inside the functions that need them; importing this module does
no I/O. Install them with the ``text`` extra (``pip install imret[text]``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    import scipy.sparse

__all__ = [
    "CaptionTokenizer",
    "TfidfConfig",
    "CaptionEncoder",
    "project_tfidf",
    "tfidf_similarity",
    "ENCODER_FORMAT",
]

ENCODER_FORMAT = "imret.caption_encoder"
ENCODER_VERSION = 1
_META_KEY = "imret"
_TOKEN = re.compile(r"[^\W_]+")  # runs of letters and digits (Unicode)
_STOP_WORDS = ("english", None)
_STEMMERS = ("snowball", None)


def _missing(module: str) -> ImportError:
    return ImportError(f"the caption encoder needs {module}; install the text extra: pip install 'imret[text]'")


class CaptionTokenizer:
    """Text → list of terms: lower-case, letter/digit runs, stop words removed, stemmed.

    Callable on one string (scikit-learn's ``analyzer`` contract); :meth:`batch` maps a list.

    Args:
        stop_words: ``"english"`` (scikit-learn's list of 318 words, removed before stemming)
            or ``None``.
        stemmer: ``"snowball"`` (NLTK's English Snowball stemmer) or ``None``.
        min_token_len: shorter tokens are dropped (after lower-casing, before stemming).
    """

    def __init__(self, *, stop_words: str | None = "english", stemmer: str | None = "snowball", min_token_len: int = 2):
        if stop_words not in _STOP_WORDS:
            raise ValueError(f"unknown stop_words {stop_words!r}; available: 'english', None")
        if stemmer not in _STEMMERS:
            raise ValueError(f"unknown stemmer {stemmer!r}; available: 'snowball', None")
        if isinstance(min_token_len, bool) or not isinstance(min_token_len, int) or min_token_len < 1:
            raise ValueError(f"min_token_len must be a positive integer, got {min_token_len!r}")
        self.stop_words, self.stemmer, self.min_token_len = stop_words, stemmer, min_token_len
        self._stop: frozenset[str] = frozenset()
        if stop_words == "english":
            try:
                from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
            except ImportError:
                raise _missing("scikit-learn") from None
            self._stop = frozenset(ENGLISH_STOP_WORDS)
        self._stem = None
        if stemmer == "snowball":
            try:
                from nltk.stem.snowball import SnowballStemmer
            except ImportError:
                raise _missing("nltk") from None
            # stems are memoised: a caption corpus has a few thousand distinct words; bounded
            # so that untrusted query text cannot grow it without limit
            self._stem = functools.lru_cache(maxsize=1 << 16)(SnowballStemmer("english").stem)

    def __call__(self, text: str) -> list[str]:
        if not isinstance(text, str):
            raise TypeError(f"a caption must be a str, got {type(text).__name__}: {text!r:.80}")
        words = [w for w in _TOKEN.findall(text.lower()) if len(w) >= self.min_token_len and w not in self._stop]
        return [self._stem(w) for w in words] if self._stem is not None else words

    def batch(self, texts: Iterable[str]) -> list[list[str]]:
        return [self(t) for t in texts]

    def config(self) -> dict[str, Any]:
        return {"stop_words": self.stop_words, "stemmer": self.stemmer, "min_token_len": self.min_token_len}

    def __repr__(self) -> str:
        return f"CaptionTokenizer(stop_words={self.stop_words!r}, stemmer={self.stemmer!r}, min_token_len={self.min_token_len})"


@dataclass(frozen=True)
class TfidfConfig:
    """Text processing and tf-idf settings of a :class:`CaptionEncoder` (stored with it)."""

    stop_words: str | None = "english"  # "english" (scikit-learn's list) or None
    stemmer: str | None = "snowball"  # "snowball" (NLTK, English) or None
    min_token_len: int = 2  # shorter tokens are dropped
    min_df: int = 2  # keep terms found in at least this many training captions
    max_df: float = 1.0  # drop terms in more than this fraction of training captions
    max_features: int | None = None  # keep only the most frequent terms (None: all)
    sublinear_tf: bool = True  # tf -> 1 + ln(tf); see the module docstring
    smooth_idf: bool = True  # idf = ln((1 + n) / (1 + df)) + 1, else ln(n / df) + 1

    def __post_init__(self) -> None:
        CaptionTokenizer(stop_words=self.stop_words, stemmer=self.stemmer, min_token_len=self.min_token_len)
        if isinstance(self.min_df, bool) or not isinstance(self.min_df, int) or self.min_df < 1:
            raise ValueError(f"min_df must be a positive integer (a count of captions), got {self.min_df!r}")
        if isinstance(self.max_df, bool) or not isinstance(self.max_df, (int, float)) or not 0 < self.max_df <= 1:
            raise ValueError(f"max_df must be a fraction in (0, 1], got {self.max_df!r}")
        if self.max_features is not None and (
            isinstance(self.max_features, bool) or not isinstance(self.max_features, int) or self.max_features < 1
        ):
            raise ValueError(f"max_features must be a positive integer or None, got {self.max_features!r}")
        for name in ("sublinear_tf", "smooth_idf"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TfidfConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown tf-idf setting(s) {unknown}; available: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_csr(x: Any, num_terms: int) -> "scipy.sparse.csr_matrix":
    import scipy.sparse as sp

    if not sp.issparse(x):
        raise TypeError(f"expected a scipy sparse tf-idf matrix, got {type(x).__name__}")
    x = sp.csr_matrix(x)
    if x.ndim != 2 or x.shape[1] != num_terms:
        raise ValueError(f"tf-idf matrix must have {num_terms} columns (the vocabulary), got shape {x.shape}")
    return x


def project_tfidf(x: "scipy.sparse.spmatrix", weight: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """``θ = Wᵀ t / ‖Wᵀ t‖`` for each row ``t`` of a sparse tf-idf matrix.

    Args:
        x: ``(N, V)`` scipy sparse tf-idf rows.
        weight: ``(D, V)``, the weight of ``nn.Linear(V, D, bias=False)`` (so ``Wᵀ t`` is
            ``weight @ t``); gradients flow into it.
        normalize: L2-normalise the rows (a row without a vocabulary term stays all zeros).

    Returns:
        ``(N, D)`` in ``weight``'s dtype and device. Only the non-zero entries of ``x`` are
        touched (an ``embedding_bag`` with per-entry weights): ``O(nnz · D)``.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be (D, V), got shape {tuple(weight.shape)}")
    x = _check_csr(x, weight.shape[1])
    x.sort_indices()
    dev = weight.device
    idx = torch.from_numpy(x.indices.astype(np.int64)).to(dev)
    offsets = torch.from_numpy(x.indptr[:-1].astype(np.int64)).to(dev)
    vals = torch.from_numpy(np.asarray(x.data)).to(device=dev, dtype=weight.dtype)
    if idx.numel() == 0:
        out = weight.new_zeros(x.shape[0], weight.shape[0]) + 0 * weight.sum()
    else:
        # one bag per row; an empty bag (a row without terms) sums to zeros
        out = F.embedding_bag(idx, weight.t(), offsets, mode="sum", per_sample_weights=vals)
    return F.normalize(out, dim=1, eps=1e-12) if normalize else out


def tfidf_similarity(a: "scipy.sparse.spmatrix", b: "scipy.sparse.spmatrix | None" = None) -> np.ndarray:
    """Cosine similarities ``a bᵀ`` of L2-normalised tf-idf rows: ``(Na, Nb)`` float64 in [0, 1].

    With image-level rows (:meth:`CaptionEncoder.transform_images`) this is Gordo & Larlus's
    semantic relevance between images. ``b`` defaults to ``a``.
    """
    import scipy.sparse as sp

    if not sp.issparse(a) or (b is not None and not sp.issparse(b)):
        raise TypeError("tfidf_similarity expects scipy sparse tf-idf matrices")
    b = a if b is None else b
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"tf-idf matrices over different vocabularies: {a.shape[1]} vs {b.shape[1]} columns")
    return np.asarray((sp.csr_matrix(a) @ sp.csr_matrix(b).T).toarray(), dtype=np.float64)


class CaptionEncoder(nn.Module):
    """tf-idf over training captions + a learned projection ``W``: captions → ``(N, D)`` unit rows.

    Usage (an open_clip-like text contract)::

        enc = CaptionEncoder(dim=512).fit(train_captions)   # vocabulary, idf, random W
        theta = enc(captions)                  # torch (N, D), differentiable in W (training)
        rows = enc.encode_text(["a dog runs"])  # numpy float32 (N, D), L2-normalised
        enc.tokenizer("A dog runs")            # ['dog', 'run']
        enc.save("text.safetensors"); CaptionEncoder.load("text.safetensors")

    Args:
        dim: ``D``, the visual embedding size.
        config: a :class:`TfidfConfig`; or its fields as keyword arguments.
    """

    def __init__(self, dim: int = 512, config: TfidfConfig | None = None, **settings: Any):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if config is not None and settings:
            raise ValueError("give config or keyword settings, not both")
        self.dim = dim
        self.config = config if config is not None else TfidfConfig.from_dict(settings)
        self.tokenizer = CaptionTokenizer(
            stop_words=self.config.stop_words, stemmer=self.config.stemmer, min_token_len=self.config.min_token_len
        )
        self.vocabulary: list[str] = []
        self._index: dict[str, int] = {}
        self.register_buffer("idf", torch.zeros(0, dtype=torch.float64))
        self.proj: nn.Linear | None = None

    # --- vocabulary and tf-idf ------------------------------------------------------------

    @property
    def is_fitted(self) -> bool:
        return self.proj is not None

    @property
    def num_terms(self) -> int:
        return len(self.vocabulary)

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError("the caption encoder is not fitted: call fit(captions) or CaptionEncoder.load(path)")

    def _set_vocabulary(self, vocabulary: Sequence[str], idf: np.ndarray, weight: torch.Tensor | None, seed: int = 0) -> None:
        vocabulary = list(vocabulary)
        if not vocabulary:
            raise ValueError("empty vocabulary")
        if not all(isinstance(t, str) and t for t in vocabulary):
            raise ValueError("vocabulary terms must be non-empty strings")
        index = {t: i for i, t in enumerate(vocabulary)}
        if len(index) != len(vocabulary):
            raise ValueError("vocabulary has repeated terms")
        idf = np.asarray(idf, dtype=np.float64)
        if idf.shape != (len(vocabulary),) or not np.all(np.isfinite(idf)) or np.any(idf <= 0):
            raise ValueError(f"idf must be {len(vocabulary)} finite positive numbers, got shape {idf.shape}")
        proj = nn.Linear(len(vocabulary), self.dim, bias=False)
        with torch.no_grad():
            if weight is None:
                g = torch.Generator().manual_seed(seed)
                # nn.Linear's default range, drawn from a seeded generator
                bound = 1.0 / math.sqrt(len(vocabulary))
                proj.weight.uniform_(-bound, bound, generator=g)
            else:
                if tuple(weight.shape) != (self.dim, len(vocabulary)):
                    raise ValueError(
                        f"projection weight must be (dim={self.dim}, vocabulary={len(vocabulary)}), got {tuple(weight.shape)}"
                    )
                if not torch.isfinite(weight).all():
                    raise ValueError("projection weight has non-finite values")
                proj.weight.copy_(weight)
        self.vocabulary, self._index = vocabulary, index
        self.idf = torch.from_numpy(idf.copy())
        self.proj = proj

    def fit(self, captions: Sequence[str], *, seed: int = 0) -> CaptionEncoder:
        """Learn the vocabulary and idf from training captions (one document per caption) and
        draw a random projection ``W`` (seeded). Returns ``self``."""
        captions = self._check_texts(captions)
        try:
            from sklearn.feature_extraction.text import TfidfVectorizer
        except ImportError:
            raise _missing("scikit-learn") from None
        c = self.config
        vec = TfidfVectorizer(
            analyzer=self.tokenizer, min_df=c.min_df, max_df=float(c.max_df), max_features=c.max_features,
            sublinear_tf=c.sublinear_tf, smooth_idf=c.smooth_idf, norm="l2", dtype=np.float64,
        )
        try:
            vec.fit(captions)
        except ValueError as e:  # "empty vocabulary; perhaps the documents only contain stop words", ...
            raise ValueError(f"cannot fit the caption vocabulary on {len(captions)} captions: {e}") from None
        terms = sorted(vec.vocabulary_, key=vec.vocabulary_.__getitem__)
        self._set_vocabulary(terms, vec.idf_, None, seed)
        return self

    @staticmethod
    def _check_texts(texts: Sequence[str] | str) -> list[str]:
        if isinstance(texts, str):
            raise TypeError("expected a sequence of captions, got one str; wrap it in a list")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"caption {i} is a {type(t).__name__}, not a str: {t!r:.80}")
        return texts

    def _counts(self, docs: Iterable[Iterable[str]]) -> "scipy.sparse.csr_matrix":
        """Term counts of documents, each document a list of captions."""
        import scipy.sparse as sp

        indptr, indices, data = [0], [], []
        for doc in docs:
            row: dict[int, int] = {}
            for text in doc:
                for term in self.tokenizer(text):
                    j = self._index.get(term)
                    if j is not None:
                        row[j] = row.get(j, 0) + 1
            cols = sorted(row)
            indices.extend(cols)
            data.extend(row[j] for j in cols)
            indptr.append(len(indices))
        return sp.csr_matrix(
            (np.asarray(data, dtype=np.float64), np.asarray(indices, dtype=np.int64), np.asarray(indptr, dtype=np.int64)),
            shape=(len(indptr) - 1, self.num_terms),
        )

    def _weight(self, counts: "scipy.sparse.csr_matrix") -> "scipy.sparse.csr_matrix":
        x = counts.copy()
        if self.config.sublinear_tf:
            x.data = 1.0 + np.log(x.data)
        x = x.multiply(self.idf.cpu().numpy()[None, :]).tocsr()
        return _l2_rows(x)

    def transform(self, captions: Sequence[str]) -> "scipy.sparse.csr_matrix":
        """``(N, V)`` float64 L2-normalised tf-idf rows, one per caption (as scikit-learn's
        ``TfidfVectorizer.transform``). A caption without a vocabulary term is an all-zero row."""
        self._require_fitted()
        return self._weight(self._counts([t] for t in self._check_texts(captions)))

    def transform_images(self, captions_per_image: Sequence[Sequence[str]], *, how: str = "concat") -> "scipy.sparse.csr_matrix":
        """``(N_images, V)`` L2-normalised tf-idf rows, one per image, from all its captions.

        Args:
            captions_per_image: per image, its captions.
            how: ``"concat"`` (default; Gordo & Larlus: the captions of an image form one
                document, whose term counts are weighted as for a caption) or ``"mean"`` (the
                mean of the captions' tf-idf rows, L2-normalised).
        """
        self._require_fitted()
        if how not in ("concat", "mean"):
            raise ValueError(f"unknown how {how!r}; available: 'concat', 'mean'")
        docs = [self._check_texts(c) for c in captions_per_image]
        for i, d in enumerate(docs):
            if not d:
                raise ValueError(f"image {i} has no caption")
        if how == "concat":
            return self._weight(self._counts(docs))
        import scipy.sparse as sp

        rows = self.transform([t for d in docs for t in d])
        owner = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
        pool = sp.csr_matrix((1.0 / np.repeat([len(d) for d in docs], [len(d) for d in docs]), (owner, np.arange(len(owner)))),
                             shape=(len(docs), len(owner)))
        return _l2_rows(sp.csr_matrix(pool @ rows))

    # --- embedding -----------------------------------------------------------------------

    def forward(self, x: "Sequence[str] | scipy.sparse.spmatrix") -> torch.Tensor:
        """``θ = Wᵀ t / ‖Wᵀ t‖``: ``(N, D)`` on ``W``'s device, differentiable in ``W``.

        ``x``: captions, or their ``(N, V)`` tf-idf rows from :meth:`transform` /
        :meth:`transform_images` (computed once per epoch, this skips the tokenisation).
        """
        self._require_fitted()
        import scipy.sparse as sp

        if not sp.issparse(x):
            x = self.transform(x)
        return project_tfidf(x, self.proj.weight)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str], *, batch_size: int = 4096) -> np.ndarray:
        """``(N, D)`` float32 L2-normalised rows (all-zero for a caption without a known term)."""
        self._require_fitted()
        captions = self._check_texts(captions)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        out = np.zeros((len(captions), self.dim), dtype=np.float32)
        for s in range(0, len(captions), batch_size):
            out[s : s + batch_size] = self(captions[s : s + batch_size]).float().cpu().numpy()
        return out

    # --- persistence ---------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, JSON-serialisable: format, dim, tf-idf config, vocabulary."""
        self._require_fitted()
        return {
            "format": ENCODER_FORMAT,
            "version": ENCODER_VERSION,
            "dim": self.dim,
            "tfidf": self.config.to_dict(),
            "vocabulary": list(self.vocabulary),
        }

    @classmethod
    def from_state(cls, metadata: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> CaptionEncoder:
        """Rebuild from :meth:`metadata` and ``state_dict()`` (``proj.weight``, ``idf``); strict."""
        if not isinstance(metadata, dict) or metadata.get("format") != ENCODER_FORMAT:
            raise ValueError(f"not a caption encoder: metadata format {metadata.get('format') if isinstance(metadata, dict) else metadata!r}, expected {ENCODER_FORMAT!r}")
        if metadata.get("version") != ENCODER_VERSION:
            raise ValueError(f"unsupported caption encoder version {metadata.get('version')!r}; supported: {ENCODER_VERSION}")
        unknown = sorted(set(metadata) - {"format", "version", "dim", "tfidf", "vocabulary"})
        if unknown:
            raise ValueError(f"unknown caption encoder metadata key(s) {unknown}")
        keys = set(state_dict)
        if keys != {"proj.weight", "idf"}:
            raise ValueError(f"caption encoder tensors must be exactly proj.weight and idf; got {sorted(keys)}")
        enc = cls(metadata["dim"], TfidfConfig.from_dict(dict(metadata["tfidf"])))
        enc._set_vocabulary(metadata["vocabulary"], state_dict["idf"].double().cpu().numpy(), state_dict["proj.weight"].float())
        return enc

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file: ``proj.weight`` (D, V) float32, ``idf`` (V,) float64, and the
        :meth:`metadata` as JSON in the header. Written atomically; no pickle."""
        from safetensors.torch import save_file

        from ..fileio import atomic_path

        meta = self.metadata()
        tensors = {"proj.weight": self.proj.weight.detach().float().cpu().contiguous(), "idf": self.idf.detach().cpu().contiguous()}
        with atomic_path(path) as tmp:
            save_file(tensors, os.fspath(tmp), metadata={_META_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu") -> CaptionEncoder:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error types for a broken header
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        if _META_KEY not in header:
            raise ValueError(f"{path}: no caption encoder metadata (is it an image model?)")
        try:
            meta = json.loads(header[_META_KEY])
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: broken caption encoder metadata: {e}") from None
        try:
            enc = cls.from_state(meta, tensors)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None
        return enc.to(device)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, terms={self.num_terms}, {self.config}"


def _l2_rows(x: "scipy.sparse.csr_matrix") -> "scipy.sparse.csr_matrix":
    x = x.tocsr().astype(np.float64)
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    x = x.multiply(scale[:, None]).tocsr()
    x.eliminate_zeros()
    x.sort_indices()
    return x
