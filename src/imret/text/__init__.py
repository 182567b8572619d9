"""Text side of the joint image–caption embedding (Gordo & Larlus, CVPR 2017).

* :mod:`.captions`: captions CSV (``path,caption``) and Flickr8k layout → :class:`CaptionedImages`.
* :mod:`.encoder`: :class:`CaptionEncoder`, tf-idf + learned projection ``θ(t) = Wᵀt / ‖Wᵀt‖``,
  and the caption tf-idf similarity that serves as semantic relevance between images.
* :mod:`.losses`: the paper's visual and cross-modal ranking losses with in-batch triplet mining.
* :mod:`.queries`: text queries of a search (checks of untrusted text, loading a caption model
  file as untrusted input, a picture of a text for result sheets); the searches themselves are
  :meth:`imret.retrieval.Retriever.search` and :meth:`imret.index.store.Store.search` with ``text=``.

Importing this package does no I/O and imports neither scikit-learn nor NLTK (the ``text``
extra); they are imported when an encoder is built.
"""

from __future__ import annotations

from .captions import CaptionedImages, assign_splits, load_flickr8k, read_captions_csv, read_split_list
from .encoder import CaptionEncoder, CaptionTokenizer, TfidfConfig, project_tfidf, tfidf_similarity
from .losses import (
    JointLoss,
    JointRankingLoss,
    joint_ranking_loss,
    mine_hard_triplets,
    pair_ranking_loss,
    ranking_loss,
    semantic_triplets,
)

__all__ = [
    "CaptionedImages",
    "read_captions_csv",
    "read_split_list",
    "assign_splits",
    "load_flickr8k",
    "CaptionTokenizer",
    "TfidfConfig",
    "CaptionEncoder",
    "project_tfidf",
    "tfidf_similarity",
    "semantic_triplets",
    "mine_hard_triplets",
    "ranking_loss",
    "pair_ranking_loss",
    "joint_ranking_loss",
    "JointLoss",
    "JointRankingLoss",
]
