"""Near-duplicate detection on real photos: imret.dedup against imagededup's perceptual hashes.

From the 250 photos of rParis6k-mini (``$IMRET_SHARED/data/rparis6k-mini/jpg``, default
``../shared`` next to the repository; read in place, never copied into the repo), seeded:
``--originals`` photos (100) each get one near-duplicate made by an edit of
:data:`imret.dedup.EDITS` (crop 60-90 %, resize 30-70 %, JPEG q 20-50, left-right flip, rotation
by 90/180/270°, colour jitter, overlaid text; the edits dealt out evenly in random order), written
to a temporary folder; the other photos (150) are distinct distractors. Every method sees the
same 350 files and is scored on pairs: a predicted pair is two files in one group (imret) or
in each other's duplicate list (hashes); the truth is the 100 (original, copy) pairs.
Precision = correct predicted pairs / predicted pairs, recall = found true pairs / 100, and
recall per edit.

imret runs with the library's defaults: EfficientNet-Lite0 (ImageNet weights from pip), GeM,
512 px, test-time variants flip / rot90 / rot180, candidates at cosine >= 0.7 among 8
neighbours, RootSIFT verification (:class:`imret.dedup.DuplicateCheck`: a near-similarity, the
inliers' median residual from it, the aligned pixels' correlation). The same descriptors
also give the rows without the residual test (the default before it), without test-time
variants and without verification (descriptor only, cosine >= 0.85). imagededup (``pip install imagededup``) PHash and DHash with its default
Hamming threshold (10 of 64 bits).

    .venv/bin/python benchmarks/dedup.py [--originals 100] [--distinct 150] [--seed 0] [--write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, machine_line, publish  # noqa: E402

BEGIN = "<!-- dedup:begin -->"
END = "<!-- dedup:end -->"
BACKBONE = "tf_efficientnet_lite0"
SIZE = 512


def make_set(files: list[Path], n_orig: int, n_distinct: int, seed: int, out: Path):
    """``(paths, truth pairs {(a, b)}, edit of each pair)``: originals, their copies, distractors."""
    from PIL import Image

    from imret.dedup import EDITS, apply_edit

    if n_orig + n_distinct > len(files):
        raise ValueError(f"asked for {n_orig} originals + {n_distinct} distinct photos, but {len(files)} exist")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))
    orig = [str(files[i]) for i in order[:n_orig]]
    distinct = [str(files[i]) for i in order[n_orig:n_orig + n_distinct]]
    edits = [EDITS[i % len(EDITS)] for i in range(n_orig)]
    edits = [edits[i] for i in rng.permutation(n_orig)]
    copies = []
    for n, (p, e) in enumerate(zip(orig, edits)):
        q = out / f"copy_{n:03d}_{e}.jpg"
        with Image.open(p) as im:
            apply_edit(im, e, rng).save(q, quality=95)
        copies.append(str(q))
    paths = orig + copies + distinct
    truth = {(i, n_orig + i): edits[i] for i in range(n_orig)}
    return paths, truth


def group_pairs(groups) -> set[tuple[int, int]]:
    return {(a, b) for g in groups for a in g for b in g if a < b}


def score(pred: set[tuple[int, int]], truth: dict[tuple[int, int], str]) -> dict:
    found = pred & set(truth)
    edits = sorted(set(truth.values()))
    per = {e: np.mean([t in pred for t, v in truth.items() if v == e]) for e in edits}
    return {"pairs": len(pred), "correct": len(found), "precision": len(found) / len(pred) if pred else 1.0,
            "recall": len(found) / len(truth), "per_edit": per}


def hash_pairs(method, paths: list[str]) -> tuple[set[tuple[int, int]], float]:
    """imagededup: encode every file, find duplicates at the default threshold; pairs of positions."""
    t0 = time.perf_counter()
    enc = {}
    for i, p in enumerate(paths):
        h = method.encode_image(image_file=p)
        if h is not None:
            enc[str(i)] = h
    dups = method.find_duplicates(encoding_map=enc, max_distance_threshold=10)
    dt_ = time.perf_counter() - t0
    pred = {(min(int(a), int(b)), max(int(a), int(b))) for a, v in dups.items() for b in v}
    return pred, dt_


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "data" / "rparis6k-mini" / "jpg"))
    ap.add_argument("--originals", type=int, default=100)
    ap.add_argument("--distinct", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = ap.parse_args()

    import torch

    import imret
    from imret import dedup
    from imret.extract import extract

    torch.set_num_threads(args.threads)
    files = sorted(Path(args.data).glob("*.jpg"))
    if not files:
        raise SystemExit(f"no photos in {args.data} (set IMRET_SHARED)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="imret-dedup-") as tmp:
        paths, truth = make_set(files, args.originals, args.distinct, args.seed, Path(tmp))
        n = len(paths)

        model = imret.create_model(BACKBONE, "gem", pretrained=True)

        def encode(ims):
            return extract(model, ims, image_size=SIZE, on_error="raise").descriptors

        # what the variants cost: the same 20 files described without and with them
        sub = paths[:20]
        t0 = time.perf_counter()
        dedup.describe_variants(encode, sub, "none", image_size=SIZE)
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        dedup.describe_variants(encode, sub, dedup.DEFAULT_TTA, image_size=SIZE)
        t_tta = time.perf_counter() - t0

        cache = REPO / "runs" / "cache" / "dedup" / f"desc-{args.originals}-{args.distinct}-{args.seed}.npz"
        if cache.is_file():
            z = np.load(cache)
            desc, t_describe = z["desc"], float(z["seconds"])
        else:
            t0 = time.perf_counter()
            desc, kept, skipped = dedup.describe_variants(encode, paths, dedup.DEFAULT_TTA, image_size=SIZE,
                                                          progress=True)
            t_describe = time.perf_counter() - t0
            assert kept.size == n and not skipped, skipped
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, desc=desc, seconds=t_describe)
        x, var = desc[:, 0], desc[:, 1:]

        # cosines: each true pair with and without the variants, and the closest distinct pairs
        tp = np.asarray(sorted(truth))
        with_v = dedup.pair_scores(x, tp, variants=var)
        without = dedup.pair_scores(x, tp)
        sims = x @ x.T
        is_true = np.zeros_like(sims, bool)
        is_true[tp[:, 0], tp[:, 1]] = is_true[tp[:, 1], tp[:, 0]] = True
        np.fill_diagonal(is_true, True)
        other = np.sort(sims[~is_true & np.triu(np.ones_like(is_true), 1)])[::-1]
        cos = {e: (float(without[[truth[tuple(t)] == e for t in tp.tolist()]].min()),
                   float(with_v[[truth[tuple(t)] == e for t in tp.tolist()]].min())) for e in dedup.EDITS}

        def run(name, **kw):
            t0 = time.perf_counter()
            res = dedup.deduplicate(paths, paths, x, progress=True, **kw)
            t = time.perf_counter() - t0
            r = score(group_pairs(res.groups), truth)
            r.update(name=name, candidates=res.candidates, seconds=t, res=res)
            rows.append(r)
            return r

        full = run("imret (default: variants + RootSIFT)", variants=var, variant_names=dedup.DEFAULT_TTA)
        full["seconds"] += t_describe
        run("imret, without the inlier-residual test (the previous default)", variants=var,
            variant_names=dedup.DEFAULT_TTA, check=dedup.DuplicateCheck(max_residual=0))["seconds"] += t_describe
        run("imret, no test-time variants", variants=None)["seconds"] += t_describe * t_plain / t_tta
        run("imret, descriptors only (--no-verify)", variants=var, variant_names=dedup.DEFAULT_TTA,
            verify=False)["seconds"] += t_describe
        wrong = [(paths[a], paths[b]) for a, b in group_pairs(full["res"].groups) - set(truth)]
        # median inlier residual of the confirmed (photo, copy) pairs, the largest per edit
        resid = {}
        for p in full["res"].pairs:
            if (p.a, p.b) in truth:
                e = truth[(p.a, p.b)]
                resid[e] = max(resid.get(e, 0.0), p.residual)
        wrong_resid = [p.residual for p in full["res"].pairs if (p.a, p.b) not in truth]
        missed = [(truth[t], full["res"].pairs and paths[t[1]]) for t in truth if t not in group_pairs(full["res"].groups)]

        try:
            from imagededup.methods import DHash, PHash
        except ImportError:
            PHash = DHash = None
        if PHash is not None:
            for name, m in (("imagededup PHash (distance <= 10)", PHash(verbose=False)),
                            ("imagededup DHash (distance <= 10)", DHash(verbose=False))):
                pred, t = hash_pairs(m, paths)
                r = score(pred, truth)
                r.update(name=name, candidates=len(pred), seconds=t)
                rows.append(r)

    edits = list(dedup.EDITS)
    per_count = {e: sum(v == e for v in truth.values()) for e in edits}
    out = [BEGIN, "## Near-duplicate detection (imret dedup)", "",
           f"`.venv/bin/python benchmarks/dedup.py --originals {args.originals} --distinct {args.distinct} "
           f"--seed {args.seed} --threads {args.threads}` on {machine_line()}, "
           f"{dt.date.today().isoformat()}.", "",
           f"{n} files: {args.originals} rParis6k-mini photos, one near-duplicate of each "
           f"({', '.join(f'{e} {per_count[e]}' for e in edits)}; crop 60-90 % of each side, resize 30-70 %, "
           "JPEG q 20-50, left-right flip, rotation 90/180/270°, colour jitter ×0.7-1.3, overlaid text), and "
           f"{args.distinct} other photos of the same landmarks. Scored on pairs (imret: two files in one group; "
           "hashes: in each other's list); truth: the (photo, copy) pairs. imret: "
           f"{BACKBONE} + GeM (ImageNet weights from pip), {SIZE} px, library defaults "
           f"(variants {', '.join(dedup.DEFAULT_TTA)}; cosine ≥ {dedup.DEFAULT_THRESHOLD_VERIFY} among "
           f"{dedup.DEFAULT_K} neighbours, then RootSIFT + MAGSAC++ near-similarity, mirrored too, inliers' median "
           f"residual ≤ {dedup.DuplicateCheck().max_residual:g} px, aligned grey NCC ≥ "
           f"{dedup.DuplicateCheck().min_correlation:g}; "
           f"descriptor only: cosine ≥ {dedup.DEFAULT_THRESHOLD_DESCRIPTOR}). Time: the whole run on this CPU, "
           f"{args.threads} torch threads (imret rows include describing the files).", "",
           "| method | precision | recall | " + " | ".join(edits) + " | pairs predicted | time (s) |",
           "|---|---|---|" + "---|" * len(edits) + "---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['precision']:.3f} | {r['recall']:.3f} | "
                   + " | ".join(f"{r['per_edit'].get(e, float('nan')):.2f}" for e in edits)
                   + f" | {r['pairs']} | {r['seconds']:.0f} |")
    out += ["", f"Test-time variants: describing 20 files took {t_plain:.1f} s without and {t_tta:.1f} s with "
            f"the {len(dedup.DEFAULT_TTA)} variants (×{t_tta / t_plain:.1f}). Candidate pairs checked by RootSIFT: "
            f"{rows[0]['candidates']}.",
            "", "imret default: " + (f"{len(wrong)} wrong pair(s): " + "; ".join(
                f"{Path(a).name} ~ {Path(b).name}" for a, b in wrong[:5]) if wrong else "no wrong pair")
            + "; " + (f"{len(missed)} missed: " + ", ".join(e for e, _ in missed[:10]) if missed else "none missed")
            + ".", "",
            "Median residual of the inliers from the least-squares affine map (pixels of the coarser image at "
            "≤ 1024 px), largest over the copies found, per edit: "
            + ", ".join(f"{e} {resid[e]:.2f}" for e in edits if e in resid)
            + (f"; over the wrong pairs confirmed: {min(wrong_resid):.2f}-{max(wrong_resid):.2f}" if wrong_resid else "")
            + f" (bar {dedup.DuplicateCheck().max_residual:g}).", "",
            "Lowest cosine of a (photo, copy) pair per edit, without / with the variants: "
            + ", ".join(f"{e} {a:.2f} / {b:.2f}" for e, (a, b) in cos.items())
            + f". Distinct photos (no variants): highest {other[0]:.2f}, 10th {other[min(9, other.size - 1)]:.2f}, "
            f"{int((other >= dedup.DEFAULT_THRESHOLD_VERIFY).sum())} pairs ≥ {dedup.DEFAULT_THRESHOLD_VERIFY}.", END]
    for r in rows:
        r.pop("res", None)
    publish("\n".join(out) + "\n", BEGIN, END, write=args.write, data=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
