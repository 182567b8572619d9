"""``imret search STORE --text ...`` and ``imret eval --captions CSV --text-model T``: the text
side of a joint image–caption model on the command line (thin over :mod:`imret.text`,
:meth:`imret.index.store.Store.search` and :mod:`imret.semantic_eval`).

Only the CLI prints; these functions are called by :mod:`imret.cli`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

__all__ = ["search_text", "cmd_eval_captions"]


def search_text(args):
    """The text queries of ``imret search`` (``--text``, repeatable) searched in the store:
    ``(results, seconds)``; a query without a known word comes back with its ``error``."""
    from .cli import _backend_options, _query_expansion_override, _rerank_option
    from .index.store import Store
    from .retrieval import needs_query_image
    from .text.queries import check_text_queries, load_text_model

    if args.queries or args.list or args.csv or args.bbox:
        raise ValueError("give query photos or --text, not both (search them in two runs)")
    if args.localize:
        raise ValueError("--localize draws the query object in each hit; a text query has no object to localise")
    texts = check_text_queries(args.text)
    rerank = _rerank_option(args)
    text_model = load_text_model(args.text_model) if args.text_model is not None else None
    with Store.open(args.store, device=args.device, backend_options=_backend_options()) as store:
        if text_model is not None and text_model.dim != store.dim:
            raise ValueError(f"--text-model {args.text_model!r} embeds text in {text_model.dim}-D, but the store's "
                             f"descriptors are {store.dim}-D; give the caption model of the store's joint model")
        if rerank is None:
            skipped = [s for s in store.rerank_specs if needs_query_image(s)]
            if skipped:
                print(f"note: the store's re-ranker(s) {' + '.join(skipped)} look at the query's pixels; text "
                      "queries are searched without them", file=sys.stderr)
        qe = _query_expansion_override(args, store.query_expansion)
        t0 = time.perf_counter()
        results = store.search(text=texts, k=args.k, query_expansion=qe, rerank=rerank, on_error="skip",
                               text_model=text_model)
        return results, time.perf_counter() - t0


def _captioned_images(args):
    """The captioned images ``imret eval`` evaluates: a captions CSV (optionally limited to a
    split list) or a Flickr8k split."""
    from .text import assign_splits, load_flickr8k, read_captions_csv, read_split_list
    from .text.captions import CaptionedImages

    if args.captions and args.flickr8k:
        raise ValueError("give --captions CSV or --flickr8k ROOT, not both")
    if args.flickr8k:
        if args.split_file or args.image_root:
            raise ValueError("--split-file and --image-root go with --captions; Flickr8k has its own (--split)")
        images = load_flickr8k(args.flickr8k)
        split = args.split or "test"
        return images.subset(split), f"Flickr8k {split}", [Path(args.flickr8k) / "captions.csv"]
    if args.split:
        raise ValueError("--split names a Flickr8k split (with --flickr8k); with --captions give --split-file FILE")
    images = read_captions_csv(args.captions, args.image_root)
    files = [Path(args.captions)]
    name = Path(args.captions).name
    if args.split_file:
        names = read_split_list(args.split_file)
        try:  # by file name, as Flickr8k's lists: a name must be unique among the CSV's images
            chosen = assign_splits(images.paths, {"split": names})
        except ValueError as e:
            raise ValueError(f"--split-file {args.split_file}: {e} (in {args.captions})") from None
        keep = [i for i, s in enumerate(chosen) if s is not None]
        images = CaptionedImages([images.paths[i] for i in keep], [images.captions[i] for i in keep])
        files.append(Path(args.split_file))
        name += f" ({Path(args.split_file).name})"
    return images, name, files


def cmd_eval_captions(args) -> int:
    """``imret eval --captions CSV | --flickr8k ROOT --model M --text-model T``: text → image
    and image → text recall@1/5/10 and median rank (every caption a query,
    :func:`imret.semantic_eval.evaluate_cross_modal`), and semantic image → image NDCG@k / PCC
    against caption tf-idf relevance (:func:`imret.semantic_eval.evaluate_semantic`, the
    relevance's tf-idf fitted on the evaluated captions, so it is the same for every model)."""
    import numpy as np

    from . import semantic_eval as se
    from .cli import _build_model, _encode_cached, _extract_kwargs, _file_stamps, _report_skipped
    from .retrieval import Encoder
    from .text import CaptionEncoder, tfidf_similarity
    from .text.queries import load_text_model

    if args.dataset is not None:
        raise ValueError(f"--captions / --flickr8k evaluate a captioned set; drop the dataset {args.dataset!r}")
    if args.text_model is None:
        raise ValueError("a captions evaluation needs --text-model FILE (the caption model of the joint model)")
    given = [o for o, v in (("--store", args.store), ("--whiten", args.whiten), ("--whiten-file", args.whiten_file),
                            ("--dba-k", args.dba_k), ("--backend", args.backend), ("--rerank", args.rerank),
                            ("--qe", args.qe), ("--images", args.images)) if v]
    if given:
        raise ValueError(f"{', '.join(given)}: a captions evaluation ranks by caption embedding . raw image "
                         "descriptor (what the joint model was trained for), without post-processing or a store")
    images, name, files = _captioned_images(args)
    ks = tuple(sorted(set(args.ndcg_k))) if args.ndcg_k else (10, 50, 100)
    text = load_text_model(args.text_model)  # a bad file fails before the model is built
    model = _build_model(args)
    if text.dim != int(model.dim):
        raise ValueError(f"--text-model {args.text_model!r} embeds text in {text.dim}-D, but the model's descriptors "
                         f"are {model.dim}-D; give the two halves of one joint model")
    t0 = time.perf_counter()
    encoder = Encoder(model, **_extract_kwargs(args))
    base = Path(os.path.commonpath([os.path.abspath(p) for p in images.paths])) if images.paths else Path(".")
    if base.is_file():
        base = base.parent
    ex = _encode_cached(args, model, encoder, {"images": (list(images.paths), None)}, base,
                        _file_stamps(files, files[0].parent))["images"]
    _report_skipped(ex.skipped)
    idx = np.asarray(ex.indices, dtype=np.int64)
    if idx.size < 2:
        raise ValueError(f"only {idx.size} of the {len(images)} images could be read; nothing to evaluate")
    phi = np.asarray(ex.descriptors, np.float32)
    caps = [images.captions[i] for i in idx.tolist()]
    captions = [c for cs in caps for c in cs]
    owner = np.repeat(np.arange(len(caps)), [len(cs) for cs in caps])
    theta = text.encode_text(captions)
    cm = se.evaluate_cross_modal(phi, theta, owner, ks=(1, 5, 10))
    try:  # the relevance's own tf-idf (not the model's): the same for every model evaluated
        tfidf = CaptionEncoder(dim=1).fit(captions)
    except ValueError:  # a tiny set: no word in two captions
        tfidf = CaptionEncoder(dim=1, min_df=1).fit(captions)
    relevance = tfidf_similarity(tfidf.transform_images(caps))
    sem = se.evaluate_semantic(phi @ phi.T, relevance, exclude_self=True, ks=ks)
    dt = time.perf_counter() - t0
    title = (f"{name}: {model.spec.backbone} + {model.spec.pool}, {args.image_size} px; caption model "
             f"{Path(args.text_model).name} ({text.num_terms} terms); {cm.num_images} images, {cm.num_texts} captions")
    print(title)
    print(format_captions_table(cm, sem))
    print(f"({dt:.1f} s)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"format": "imret-eval-captions", "version": 1, "units": "fraction (0-1); ranks 1-based",
                   "dataset": name, "model": model.spec.to_dict(),
                   "weights_sha256": getattr(model, "weights_sha256", None),
                   "text_model": {"file": Path(args.text_model).name, "terms": text.num_terms, "dim": text.dim},
                   "image_size": args.image_size, "scales": list(args.scales), "seconds": dt,
                   "cross_modal": cm.to_dict(), "semantic": sem.to_dict(),
                   "skipped": [{"path": os.path.basename(s.path), "reason": s.reason} for s in ex.skipped]}
        (out / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
        print(f"results in {out}")
    return 0


def format_captions_table(cm, sem) -> str:
    """The figures of a captions evaluation as a small text table (recalls and NDCG / PCC in %)."""
    rk = sorted(cm.text_to_image)
    head = "".join(f"{'R@' + str(k):>8}" for k in rk) + f"{'med r':>8}{'mean r':>9}"
    lines = [f"{'':16}{head}"]
    for label, rec, med, mean in (("text -> image", cm.text_to_image, cm.text_to_image_median_rank,
                                   cm.text_to_image_mean_rank),
                                  ("image -> text", cm.image_to_text, cm.image_to_text_median_rank,
                                   cm.image_to_text_mean_rank)):
        lines.append(f"{label:16}" + "".join(f"{100 * rec[k]:8.1f}" for k in rk) + f"{med:8.0f}{mean:9.1f}")

    def pct(v):
        return "     n/a" if v is None or v != v else f"{100 * v:8.1f}"

    ks = sorted(sem.ndcg)
    lines.append("")
    lines.append(f"{'semantic i->i':16}" + "".join(f"{'@' + str(k):>8}" for k in ks) + f"{'all':>8}")
    lines.append(f"{'  NDCG':16}" + "".join(pct(sem.ndcg[k]) for k in ks))
    lines.append(f"{'  PCC':16}" + "".join(pct(sem.pcc[k]) for k in ks) + pct(sem.pcc_all))
    return "\n".join(lines)
