"""Caption reading (CSV, Flickr8k layout) and the tf-idf + projection caption encoder."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("nltk")

import torch  # noqa: E402

from imret.text import (  # noqa: E402
    CaptionEncoder,
    CaptionTokenizer,
    load_flickr8k,
    project_tfidf,
    read_captions_csv,
    read_split_list,
    tfidf_similarity,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = [
    "A dog runs on the grass .",
    "Two dogs are running through the grass",
    "A black dog running",
    "A man rides a bike on the road",
    "The man is riding his bike",
    "A child plays in the water",
    "Children playing in water , water everywhere",
]


# --- tokenizer --------------------------------------------------------------------------


def test_tokenizer_lowercases_drops_stop_words_and_stems():
    tok = CaptionTokenizer()
    assert tok("The Dogs are RUNNING, quickly!") == ["dog", "run", "quick"]
    assert tok("a b c") == []  # single letters and stop words only
    assert CaptionTokenizer(stemmer=None)("Dogs running") == ["dogs", "running"]
    assert CaptionTokenizer(stop_words=None, stemmer=None, min_token_len=1)("A dog") == ["a", "dog"]


def test_tokenizer_rejects_unknown_settings():
    with pytest.raises(ValueError, match="available: 'snowball', None"):
        CaptionTokenizer(stemmer="porter")
    with pytest.raises(ValueError, match="available: 'english', None"):
        CaptionTokenizer(stop_words="french")
    with pytest.raises(TypeError, match="must be a str"):
        CaptionTokenizer()(3)
    with pytest.raises(ValueError, match="unknown tf-idf setting.*min_dff"):
        CaptionEncoder(8, min_dff=2)


# --- tf-idf against a slow reference --------------------------------------------------


def _slow_tfidf(train, texts, *, min_df, sublinear, smooth):
    """tf-idf by the textbook formula, from Python counters."""
    tok = CaptionTokenizer()
    docs = [tok(t) for t in train]
    df = Counter(term for d in docs for term in set(d))
    vocab = sorted(t for t, c in df.items() if c >= min_df)
    n = len(docs)
    idf = {t: (math.log((1 + n) / (1 + df[t])) if smooth else math.log(n / df[t])) + 1 for t in vocab}
    out = np.zeros((len(texts), len(vocab)))
    for i, text in enumerate(texts):
        counts = Counter(w for w in tok(text) if w in idf)
        for j, t in enumerate(vocab):
            if counts[t]:
                tf = 1 + math.log(counts[t]) if sublinear else counts[t]
                out[i, j] = tf * idf[t]
        norm = math.sqrt((out[i] ** 2).sum())
        if norm:
            out[i] /= norm
    return vocab, out


@pytest.mark.parametrize("min_df,sublinear,smooth", [(1, True, True), (2, True, True), (1, False, False)])
def test_tfidf_matches_the_formula(min_df, sublinear, smooth):
    enc = CaptionEncoder(4, min_df=min_df, sublinear_tf=sublinear, smooth_idf=smooth).fit(CAPTIONS)
    queries = CAPTIONS + ["dog dog dog on a bike", "nothing known here", "water water water"]
    vocab, ref = _slow_tfidf(CAPTIONS, queries, min_df=min_df, sublinear=sublinear, smooth=smooth)
    assert enc.vocabulary == vocab
    got = enc.transform(queries)
    np.testing.assert_allclose(got.toarray(), ref, rtol=0, atol=1e-12)
    assert got.getnnz(axis=1)[-2] == 0  # no known term: an all-zero row


def test_tfidf_matches_scikit_learn():
    from sklearn.feature_extraction.text import TfidfVectorizer

    enc = CaptionEncoder(4, min_df=1).fit(CAPTIONS)
    vec = TfidfVectorizer(analyzer=CaptionTokenizer(), sublinear_tf=True).fit(CAPTIONS)
    np.testing.assert_allclose(enc.transform(CAPTIONS).toarray(), vec.transform(CAPTIONS).toarray(), atol=1e-12)


def test_min_df_two_keeps_only_shared_terms():
    enc = CaptionEncoder(4, min_df=2).fit(CAPTIONS)
    # document frequencies: dog 3, run 3, grass 2, man 2, ride 2, bike 2, play 2, water 2; but
    # "child" 1 and "children" 1 (Snowball does not fold irregular plurals), "black" 1, "road" 1
    assert enc.vocabulary == sorted(["dog", "run", "grass", "man", "ride", "bike", "play", "water"])


def test_image_tfidf_concatenates_the_captions():
    enc = CaptionEncoder(4, min_df=1).fit(CAPTIONS)
    per_image = [CAPTIONS[:3], CAPTIONS[3:5], CAPTIONS[5:]]
    concat = enc.transform_images(per_image)
    joined = enc.transform([" ".join(c) for c in per_image])
    np.testing.assert_allclose(concat.toarray(), joined.toarray(), atol=1e-12)
    # sublinear tf: "dog" three times weighs 1 + ln 3 times its idf
    j = enc.vocabulary.index("dog")
    raw = enc._counts([per_image[0]]).toarray()[0]
    w = (1 + np.log(raw[raw > 0])) * enc.idf.numpy()[raw > 0]
    assert concat[0, j] == pytest.approx((1 + math.log(3)) * enc.idf[j].item() / np.linalg.norm(w))
    mean = enc.transform_images(per_image, how="mean").toarray()
    rows = enc.transform(CAPTIONS).toarray()
    ref = np.stack([rows[:3].mean(0), rows[3:5].mean(0), rows[5:].mean(0)])
    np.testing.assert_allclose(mean, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-12)
    with pytest.raises(ValueError, match="available: 'concat', 'mean'"):
        enc.transform_images(per_image, how="sum")
    with pytest.raises(ValueError, match="image 1 has no caption"):
        enc.transform_images([CAPTIONS[:1], []])


def test_tfidf_similarity_is_the_cosine():
    enc = CaptionEncoder(4, min_df=1).fit(CAPTIONS)
    x = enc.transform(CAPTIONS)
    d = x.toarray()
    np.testing.assert_allclose(tfidf_similarity(x), d @ d.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(tfidf_similarity(x)), 1.0)
    assert tfidf_similarity(x)[0, 1] > tfidf_similarity(x)[0, 3]  # dogs vs bikes


# --- projection -------------------------------------------------------------------------


def test_projection_matches_dense_reference_and_its_gradient():
    enc = CaptionEncoder(6, min_df=1).fit(CAPTIONS, seed=3)
    texts = CAPTIONS + ["unknown words only", "dog"]
    x = enc.transform(texts)
    w = enc.proj.weight.detach().double().clone().requires_grad_()
    theta = project_tfidf(x, w)
    dense = torch.from_numpy(x.toarray())
    w_ref = w.detach().clone().requires_grad_()
    raw = dense @ w_ref.T  # Wᵀt for every row
    ref = raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(theta, ref, rtol=0, atol=1e-12)
    assert torch.all(theta[-2] == 0)  # no known term: zero vector, not NaN
    np.testing.assert_allclose(theta[:-2].norm(dim=1).detach().numpy(), 1.0, atol=1e-12)
    g = torch.randn_like(theta)
    (theta * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=0, atol=1e-12)


def test_encode_text_contract():
    enc = CaptionEncoder(8, min_df=1).fit(CAPTIONS)
    out = enc.encode_text(CAPTIONS[:3] + ["zzz"], batch_size=2)
    assert out.dtype == np.float32 and out.shape == (4, 8)
    np.testing.assert_allclose(np.linalg.norm(out[:3], axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(out[3], 0.0)
    np.testing.assert_allclose(out[:3], enc(CAPTIONS[:3]).detach().numpy(), atol=1e-6)
    with pytest.raises(TypeError, match="wrap it in a list"):
        enc.encode_text("a dog")
    with pytest.raises(RuntimeError, match="not fitted"):
        CaptionEncoder(8).encode_text(["a dog"])
    with pytest.raises(ValueError, match="empty vocabulary"):
        CaptionEncoder(8).fit(["the a an", "of the"])


def test_fit_is_seeded():
    a = CaptionEncoder(8, min_df=1).fit(CAPTIONS, seed=1).proj.weight
    b = CaptionEncoder(8, min_df=1).fit(CAPTIONS, seed=1).proj.weight
    c = CaptionEncoder(8, min_df=1).fit(CAPTIONS, seed=2).proj.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- persistence --------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    enc = CaptionEncoder(8, min_df=1, sublinear_tf=False).fit(CAPTIONS, seed=5)
    with torch.no_grad():
        enc.proj.weight.mul_(3.0)  # "trained"
    path = tmp_path / "text.safetensors"
    enc.save(path)
    back = CaptionEncoder.load(path)
    assert back.vocabulary == enc.vocabulary and back.config == enc.config and back.dim == 8
    torch.testing.assert_close(back.idf, enc.idf, rtol=0, atol=0)
    np.testing.assert_array_equal(back.encode_text(CAPTIONS), enc.encode_text(CAPTIONS))
    assert set(back.state_dict()) == {"idf", "proj.weight"}
    # one safetensors file: an 8-byte header length, then JSON; no pickle anywhere
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["imret"])
    assert meta["format"] == "imret.caption_encoder" and meta["vocabulary"] == enc.vocabulary
    assert meta["tfidf"]["sublinear_tf"] is False


def test_load_rejects_bad_files(tmp_path):
    from safetensors.torch import save_file

    enc = CaptionEncoder(4, min_df=1).fit(CAPTIONS)
    sd = {"proj.weight": enc.proj.weight.detach().contiguous(), "idf": enc.idf.contiguous()}
    meta = enc.metadata()
    cases = {
        "nometa.safetensors": (sd, None, "no caption encoder metadata"),
        "format.safetensors": (sd, {**meta, "format": "other"}, "not a caption encoder"),
        "key.safetensors": (sd, {**meta, "extra": 1}, "unknown caption encoder metadata"),
        "cfg.safetensors": (sd, {**meta, "tfidf": {**meta["tfidf"], "bogus": 1}}, "unknown tf-idf setting"),
        "shape.safetensors": ({**sd, "proj.weight": torch.zeros(4, 3)}, meta, "projection weight must be"),
        "idf.safetensors": ({**sd, "idf": -sd["idf"]}, meta, "idf must be"),
        "tensors.safetensors": ({**sd, "more": torch.zeros(1)}, meta, "exactly proj.weight and idf"),
    }
    for name, (tensors, m, msg) in cases.items():
        p = tmp_path / name
        save_file(tensors, str(p), metadata=None if m is None else {"imret": json.dumps(m)})
        with pytest.raises(ValueError, match=msg):
            CaptionEncoder.load(p)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 40)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        CaptionEncoder.load(junk)


# --- captions CSV -------------------------------------------------------------------------


def test_read_captions_csv_groups_rows_by_image(tmp_path):
    p = tmp_path / "caps.csv"
    p.write_text("path,caption\nimg/a.jpg,A dog .\nimg/b.jpg,A cat\n\n./img/a.jpg,\"A dog, running\"\n", encoding="utf-8")
    d = read_captions_csv(p)
    assert d.paths == [str(tmp_path / "img" / "a.jpg"), str(tmp_path / "img" / "b.jpg")]
    assert d.captions == [["A dog .", "A dog, running"], ["A cat"]]
    assert d.flat_captions() == (["A dog .", "A dog, running", "A cat"], [0, 0, 1])
    d2 = read_captions_csv(p, image_root="/data")
    assert d2.paths[0] == "/data/img/a.jpg"


@pytest.mark.parametrize(
    "text,msg",
    [
        ("", "empty file"),
        ("path,label\na.jpg,1\n", "unknown header 'path,label'; known layouts: path,caption"),
        ("path,caption\na.jpg\n", r"caps.csv:2: expected 2 columns"),
        ("path,caption\na.jpg,ok\nb.jpg,   \n", r"caps.csv:3: empty caption"),
        ("path,caption\n,a dog\n", r"caps.csv:2: empty path"),
        ("path,caption\na.jpg,a\x00dog\n", r"caps.csv:2: NUL character in caption"),
        ("path,caption\n", "no caption rows"),
        ("path,caption_id,caption\na.jpg,a#0,x\na.jpg,a#0,y\n", r"caps.csv:3: caption_id 'a#0' repeats line 2"),
        ("path,caption\na.jpg," + "x" * 10_001 + "\n", "the limit is 10000"),
    ],
)
def test_read_captions_csv_errors_name_the_line(tmp_path, text, msg):
    p = tmp_path / "caps.csv"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=msg):
        read_captions_csv(p)


def test_read_captions_csv_rejects_non_utf8_and_missing_images(tmp_path):
    p = tmp_path / "caps.csv"
    p.write_bytes(b"path,caption\na.jpg,caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_captions_csv(p)
    p.write_text("path,caption\na.jpg,x\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="a.jpg"):
        read_captions_csv(p, check_exists=True)


def _write_flickr(root, split_lists, extra=()):
    (root / "splits").mkdir(parents=True)
    rows = ["path,caption"]
    names = sorted({n for v in split_lists.values() for n in v} | set(extra))
    for n in names:
        rows += [f"images/{n},caption {k} of {n}" for k in range(5)]
    (root / "captions.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    files = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
    for s, names in split_lists.items():
        (root / "splits" / files[s]).write_text("".join(f"{n}\n" for n in names), encoding="utf-8")


def test_load_flickr8k_layout(tmp_path):
    _write_flickr(tmp_path, {"train": ["a.jpg", "b.jpg"], "dev": ["c.jpg"], "test": ["d.jpg"]}, extra=["e.jpg"])
    d = load_flickr8k(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in d.paths] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    assert d.splits == ["train", "train", "dev", "test", None]
    assert all(len(c) == 5 for c in d.captions)
    tr = d.subset("train")
    assert len(tr) == 2 and tr.num_captions == 10
    with pytest.raises(ValueError, match="unknown split 'val'; available: dev, test, train"):
        d.subset("val")


def test_load_flickr8k_errors(tmp_path):
    _write_flickr(tmp_path / "two", {"train": ["a.jpg"], "dev": ["a.jpg"], "test": ["b.jpg"]})
    with pytest.raises(ValueError, match="'a.jpg' is in two splits"):
        load_flickr8k(tmp_path / "two")
    _write_flickr(tmp_path / "ghost", {"train": ["a.jpg"], "dev": ["c.jpg"], "test": ["b.jpg"]})
    (tmp_path / "ghost" / "splits" / "Flickr_8k.devImages.txt").write_text("zz.jpg\n")
    with pytest.raises(ValueError, match="lists 'zz.jpg', which has no caption"):
        load_flickr8k(tmp_path / "ghost")
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        load_flickr8k(tmp_path / "nowhere")
    p = tmp_path / "list.txt"
    p.write_text("a.jpg\nb.jpg\na.jpg\n")
    with pytest.raises(ValueError, match=r"list.txt:3: 'a.jpg' repeats line 1"):
        read_split_list(p)


# --- real data ----------------------------------------------------------------------------


@pytest.mark.realdata
@pytest.mark.slow
def test_flickr8k_split_and_encoder(shared):
    root = shared / "data" / "flickr8k"
    if not (root / "captions.csv").is_file():
        pytest.skip(f"Flickr8k not found at {root}")
    data = load_flickr8k(root)
    assert len(data) == 8091 and data.num_captions == 40455
    assert Counter(data.splits) == {"train": 6000, "dev": 1000, "test": 1000, None: 91}
    assert all(len(c) == 5 for c in data.captions)
    train = data.subset("train")
    captions, owner = train.flat_captions()
    enc = CaptionEncoder(64).fit(captions)
    # 4,864 stems in the train captions, 3,026 of them in at least two captions (min_df=2)
    assert 2500 <= enc.num_terms <= 3500
    assert {"dog", "man", "run", "water", "ball"} <= set(enc.vocabulary)
    # the five captions of an image are closer to each other than to other images' captions
    test = data.subset("test")
    tc, town = test.flat_captions()
    sim = tfidf_similarity(enc.transform(tc))
    same = np.equal.outer(np.asarray(town), np.asarray(town)) & ~np.eye(len(tc), dtype=bool)
    other = ~np.equal.outer(np.asarray(town), np.asarray(town))
    assert sim[same].mean() > 3 * sim[other].mean()
    # and per image, on average over its captions, in 90% of the images or more
    per_image_same = np.array([sim[np.ix_(np.flatnonzero(np.asarray(town) == i), np.flatnonzero(np.asarray(town) == i))][
        ~np.eye(5, dtype=bool)].mean() for i in range(len(test))])
    per_image_other = np.array([sim[np.asarray(town) == i][:, np.asarray(town) != i].mean() for i in range(len(test))])
    assert np.mean(per_image_same > per_image_other) >= 0.9
