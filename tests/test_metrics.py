"""Metrics, bootstrap CIs, McNemar / DeLong comparisons and report files.

Realistic probabilities come from two small scikit-learn logistic regressions fitted on the real
PathMNIST subset (../shared/data/patches/pathmnist_train_first1000.npz): model "stats" on
per-channel colour statistics, model "pool" on 4x4 mean-pooled pixels, evaluated on a stratified
30 % hold-out (300 real images, 9 classes). Hand examples are small and marked as such.
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from fractions import Fraction

import numpy as np
import pytest
from helpers import real_data
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from histotile.errors import InvalidArgumentError
from histotile.training import metrics as M
from histotile.training.report import format_metrics_table, history_columns, write_report

# MedMNIST v2 PathMNIST label names (NCT-CRC-HE-100K), in label order.
PATHMNIST_NAMES = ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth_muscle",
                   "normal_colon_mucosa", "cancer_associated_stroma",
                   "colorectal_adenocarcinoma_epithelium"]


# ----------------------------------------------------------------------------- real fixtures
def _colour_stats(x: np.ndarray) -> np.ndarray:
    q = np.percentile(x, [10, 50, 90], axis=(1, 2)).transpose(1, 0, 2).reshape(len(x), -1)
    return np.concatenate([x.mean((1, 2)), x.std((1, 2)), q], axis=1)


def _pooled(x: np.ndarray, f: int = 7) -> np.ndarray:
    n, s = len(x), 28 // f
    return x.reshape(n, s, f, s, f, 3).mean((2, 4)).reshape(n, -1)


@pytest.fixture(scope="module")
def pathmnist() -> dict:
    """Two logistic regressions on real PathMNIST images; hold-out labels and probabilities."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = np.load(real_data("patches/pathmnist_train_first1000.npz"))
    x = data["train_images"].astype(np.float32) / 255
    y = data["train_labels"][:, 0].astype(np.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=0)
    out = {"y": y[te], "y_train": y[tr], "names": PATHMNIST_NAMES}
    for name, feats in (("stats", _colour_stats(x)), ("pool", _pooled(x))):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=0.5))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(feats[tr], y[tr])
        out[name] = model.predict_proba(feats[te])
        out[f"{name}_features"] = (feats[tr], feats[te])
    return out


def _binary(p: np.ndarray, k: int) -> np.ndarray:
    """One-vs-rest binary probabilities [rest, class k] from multiclass probabilities."""
    return np.stack([1 - p[:, k], p[:, k]], axis=1)


# ----------------------------------------------------------------------------- hand examples
def test_hand_checked_three_class_example() -> None:
    """Hand example (made up, 10 samples). Confusion matrix, rows = true, columns = predicted:

          A  B  C          A: TP 4, FN 1, FP 1 (B->A), TN 10-4-1-1 = 4
      A [ 4  1  0 ]        B: TP 2, FN 1, FP 2 (A->B, C->B), TN 10-2-1-2 = 5
      B [ 1  2  0 ]        C: TP 1, FN 1, FP 0, TN 8
      C [ 0  1  1 ]
    """
    pairs = [(0, 0)] * 4 + [(0, 1)] + [(1, 0)] + [(1, 1)] * 2 + [(2, 1), (2, 2)]
    y = np.array([t for t, _ in pairs])
    probs = np.full((10, 3), 0.1)
    probs[np.arange(10), [p for _, p in pairs]] = 0.8
    m = M.compute_metrics(y, probs, ["A", "B", "C"], n_boot=0)

    assert m["confusion_matrix"] == [[4, 1, 0], [1, 2, 0], [0, 1, 1]]
    expected = {  # sensitivity TP/(TP+FN), specificity TN/(TN+FP), ppv TP/(TP+FP), npv TN/(TN+FN)
        "A": dict(sensitivity=4 / 5, specificity=4 / 5, ppv=4 / 5, npv=4 / 5, f1=4 / 5, support=5),
        "B": dict(sensitivity=2 / 3, specificity=5 / 7, ppv=2 / 4, npv=5 / 6,
                  f1=float(2 * Fraction(1, 2) * Fraction(2, 3) / (Fraction(1, 2) + Fraction(2, 3))),
                  support=3),
        "C": dict(sensitivity=1 / 2, specificity=8 / 8, ppv=1 / 1, npv=8 / 9, f1=2 / 3, support=2),
    }
    assert expected["B"]["f1"] == pytest.approx(4 / 7)
    for name, values in expected.items():
        for key, value in values.items():
            assert m["per_class"][name][key] == pytest.approx(value), (name, key)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["balanced_accuracy"] == pytest.approx((4 / 5 + 2 / 3 + 1 / 2) / 3)
    assert m["ci"] == {"accuracy": None, "auc": None}


def test_hand_checked_binary_auc_with_a_tie() -> None:
    """Hand example: positives score 0.9, 0.6, 0.4; negatives 0.7, 0.3, 0.2, 0.4.

    Of the 12 (pos, neg) pairs the positive ranks higher in 4 + 3 + 2 and ties in 1:
    AUC = (9 + 0.5) / 12 = 19/24.
    """
    scores = np.array([0.9, 0.6, 0.4, 0.7, 0.3, 0.2, 0.4])
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    m = M.compute_metrics(y, scores, ["normal", "tumour"], n_boot=0)  # 1-D score accepted
    assert m["auc"] == pytest.approx(19 / 24)
    assert M._weighted_auc(y == 1, scores, np.ones((1, 7)))[0] == pytest.approx(19 / 24)  # noqa: SLF001 - the vectorised internals against scikit-learn


# ----------------------------------------------------------------------------- real data
def test_matches_sklearn_on_real_pathmnist(pathmnist: dict) -> None:
    y, p, names = pathmnist["y"], pathmnist["stats"], pathmnist["names"]
    pred = p.argmax(1)
    m = M.compute_metrics(y, p, names, n_boot=200)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    labels = list(range(9))
    recall = recall_score(y, pred, labels=labels, average=None, zero_division=0)
    precision = precision_score(y, pred, labels=labels, average=None, zero_division=0)
    f1 = f1_score(y, pred, labels=labels, average=None, zero_division=0)
    for k, name in enumerate(names):
        c = m["per_class"][name]
        assert c["sensitivity"] == pytest.approx(recall[k])
        assert (c["ppv"] or 0.0) == pytest.approx(precision[k])
        assert (c["f1"] or 0.0) == pytest.approx(f1[k])
        assert c["support"] == int(np.sum(y == k))
        # specificity = recall of "not k"; npv = precision of "not k" (sklearn, binary view)
        assert c["specificity"] == pytest.approx(recall_score(y != k, pred != k))
        assert c["npv"] == pytest.approx(precision_score(y != k, pred != k))
        assert c["auc"] == pytest.approx(roc_auc_score(y == k, p[:, k]))
    json.dumps(m, allow_nan=False)  # JSON-able, no nan


@pytest.mark.parametrize("rounding", [None, 2])
def test_vectorised_weighted_auc_equals_sklearn_sample_weight(pathmnist: dict, rounding) -> None:
    """The bootstrap's AUC under resample counts equals roc_auc_score(..., sample_weight=counts)."""
    y, p = pathmnist["y"], pathmnist["pool"]
    if rounding:
        p = np.round(p, rounding)  # many ties
    w = next(M._bootstrap_weights(y, 6, np.random.default_rng(3), stratified=False))  # noqa: SLF001 - the vectorised internals against scikit-learn
    assert np.all(w.sum(1) == len(y))
    for k in (0, 4, 8):
        got = M._weighted_auc(y == k, p[:, k], w)  # noqa: SLF001 - the vectorised internals against scikit-learn
        want = [roc_auc_score(y == k, p[:, k], sample_weight=row) for row in w]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_bootstrap_ci_contains_estimate_and_is_seeded(pathmnist: dict) -> None:
    y, p, names = pathmnist["y"], pathmnist["stats"], pathmnist["names"]
    a = M.compute_metrics(y, p, names, n_boot=300, seed=7)
    b = M.compute_metrics(y, p, names, n_boot=300, seed=7)
    c = M.compute_metrics(y, p, names, n_boot=300, seed=8)
    assert a["ci"] == b["ci"]
    assert a["ci"] != c["ci"]
    for key in ("accuracy", "auc"):
        lo, hi = a["ci"][key]
        assert lo < a[key] < hi
        assert hi - lo < 0.25
    assert a["bootstrap"]["method"].startswith("stratified")
    assert a["bootstrap"]["n_valid_auc"] == 300
    plain = M.compute_metrics(y, p, names, n_boot=300, seed=7, stratified=False)
    lo, hi = plain["ci"]["auc"]
    assert lo < plain["auc"] < hi


def test_stratified_resamples_keep_class_counts(pathmnist: dict) -> None:
    y = pathmnist["y"]
    w = next(M._bootstrap_weights(y, 5, np.random.default_rng(0), stratified=True))  # noqa: SLF001 - the vectorised internals against scikit-learn
    counts = np.stack([w[:, y == k].sum(1) for k in range(9)], axis=1)
    assert np.all(counts == np.bincount(y, minlength=9))


def test_absent_class_gives_none_auc_and_a_note(pathmnist: dict) -> None:
    y, p, names = pathmnist["y"], pathmnist["stats"], pathmnist["names"]
    keep = y != 4  # drop every "mucus" sample
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn warnings leak either
        m = M.compute_metrics(y[keep], p[keep], names, n_boot=100)
    assert m["auc"] is None and m["ci"]["auc"] is None
    assert m["per_class"]["mucus"]["sensitivity"] is None
    assert m["per_class"]["mucus"]["auc"] is None
    assert m["per_class"]["mucus"]["support"] == 0
    assert m["per_class"]["adipose"]["auc"] == pytest.approx(roc_auc_score(y[keep] == 0,
                                                                           p[keep, 0]))
    assert any("mucus" in note for note in m["notes"])
    assert m["ci"]["accuracy"] is not None
    json.dumps(m, allow_nan=False)


def test_binary_task_from_real_probabilities(pathmnist: dict) -> None:
    y = (pathmnist["y"] == 8).astype(int)  # tumour epithelium vs rest
    p = _binary(pathmnist["stats"], 8)
    m = M.compute_metrics(y, p, ["other", "tumour"], n_boot=200)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert m["auc_kind"].startswith("binary")
    assert m["per_class"]["tumour"]["sensitivity"] == pytest.approx(recall_score(y, p.argmax(1)))
    lo, hi = m["ci"]["auc"]
    assert lo < m["auc"] < hi


@pytest.mark.parametrize("y, probs, names", [
    (np.array([0, 1, 1]), np.array([[0.5, 0.5], [0.2, 0.8]]), ["a", "b"]),  # length mismatch
    (np.array([0, 2]), np.array([[0.5, 0.5], [0.2, 0.8]]), ["a", "b"]),  # label out of range
    (np.array([0, 1]), np.array([[2.0, 1.0], [0.2, 0.8]]), ["a", "b"]),  # logits, not probs
    (np.array([0, 1]), np.array([[0.5, 0.5], [0.2, 0.8]]), ["a", "b", "c"]),  # names mismatch
    (np.array([], int), np.zeros((0, 2)), ["a", "b"]),  # empty
])
def test_invalid_inputs_raise_a_clear_error(y, probs, names) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        M.compute_metrics(y, probs, names)
    assert err.value.hint


# ----------------------------------------------------------------------------- McNemar
def _correctness(only_a: int, only_b: int, both: int, neither: int) -> tuple:
    a = [1] * only_a + [0] * only_b + [1] * both + [0] * neither
    b = [0] * only_a + [1] * only_b + [1] * both + [0] * neither
    return np.array(a, bool), np.array(b, bool)


def test_mcnemar_exact_hand_example() -> None:
    """7 vs 2 discordant pairs: two-sided exact p = 2 * (C(9,0)+C(9,1)+C(9,2)) / 2**9 = 92/512."""
    from scipy.stats import binomtest

    r = M.mcnemar_test(*_correctness(7, 2, 30, 5))
    assert r["test"] == "McNemar exact binomial"
    assert r["p_value"] == pytest.approx(92 / 512)
    assert r["p_value"] == pytest.approx(binomtest(7, 9, 0.5).pvalue)
    assert (r["a_correct_b_wrong"], r["a_wrong_b_correct"]) == (7, 2)


def test_mcnemar_chi_square_hand_example() -> None:
    """40 vs 20 discordant pairs: chi2 = (|40 - 20| - 1)**2 / 60 = 361/60, 1 degree of freedom."""
    from scipy.stats import chi2

    r = M.mcnemar_test(*_correctness(40, 20, 100, 10))
    assert r["test"].startswith("McNemar chi-square with continuity")
    assert r["statistic"] == pytest.approx(361 / 60)
    assert r["p_value"] == pytest.approx(chi2.sf(361 / 60, 1))
    assert 0.01 < r["p_value"] < 0.02
    assert M.mcnemar_test(*_correctness(0, 0, 10, 3))["p_value"] == 1.0


# ----------------------------------------------------------------------------- DeLong
def _delong_by_definition(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """DeLong (1988) from its definition: O(m n) placement values psi(X_i, Y_j), then z."""
    def components(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, yy = s[y], s[~y]
        psi = (x[:, None] > yy[None, :]) + 0.5 * (x[:, None] == yy[None, :])
        return psi.mean(1), psi.mean(0)  # V10 (per positive), V01 (per negative)

    (a10, a01), (b10, b01) = components(a), components(b)
    m, n = len(a10), len(a01)
    s10, s01 = np.cov(np.stack([a10, b10])), np.cov(np.stack([a01, b01]))
    s = s10 / m + s01 / n
    return (a10.mean() - b10.mean()) / math.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])


def test_fast_delong_equals_the_definition(pathmnist: dict) -> None:
    from scipy.stats import norm

    for k in (1, 3, 8):
        y = pathmnist["y"] == k
        a, b = np.round(pathmnist["stats"][:, k], 3), pathmnist["pool"][:, k]  # with ties
        r = M.delong_test(y, a, b)
        z = _delong_by_definition(y, a, b)
        assert r["z"] == pytest.approx(z, rel=1e-9)
        assert r["p_value"] == pytest.approx(2 * norm.sf(abs(z)), rel=1e-9)
        assert r["auc_a"] == pytest.approx(roc_auc_score(y, a))
        assert r["auc_b"] == pytest.approx(roc_auc_score(y, b))


def test_delong_agrees_with_paired_bootstrap(pathmnist: dict) -> None:
    """Two estimates of the same null distribution: p-values agree to a few hundredths."""
    for k in range(9):
        y = (pathmnist["y"] == k).astype(int)
        pa, pb = _binary(pathmnist["stats"], k), _binary(pathmnist["pool"], k)
        d = M.delong_test(y, pa[:, 1], pb[:, 1])
        bt = M.paired_bootstrap_auc_test(y, pa, pb, n_boot=2000, seed=k)
        assert bt["difference"] == pytest.approx(d["difference"])
        assert abs(d["p_value"] - bt["p_value"]) < 0.05 + 0.2 * d["p_value"], k
        assert np.sign(d["z"]) == np.sign(bt["z"])


def test_delong_identical_models() -> None:
    y = np.array([1, 0, 1, 0, 1, 1, 0])
    s = np.array([0.9, 0.2, 0.6, 0.7, 0.4, 0.8, 0.1])
    r = M.delong_test(y, s, s)
    assert r["difference"] == 0 and r["p_value"] == 1.0


# ----------------------------------------------------------------------------- compare_models
def test_compare_models_multiclass_real(pathmnist: dict) -> None:
    y, pa, pb, names = pathmnist["y"], pathmnist["stats"], pathmnist["pool"], pathmnist["names"]
    r = M.compare_models(y, pa, pb, names, n_boot=500)
    ca, cb = pa.argmax(1) == y, pb.argmax(1) == y
    assert r["accuracy"]["a"] == pytest.approx(ca.mean())
    assert r["accuracy"]["difference"] == pytest.approx(ca.mean() - cb.mean())
    assert r["mcnemar"]["a_correct_b_wrong"] == int(np.sum(ca & ~cb))
    assert r["mcnemar"]["a_wrong_b_correct"] == int(np.sum(~ca & cb))
    assert 0 <= r["mcnemar"]["p_value"] <= 1
    assert r["auc"]["test"].startswith("paired stratified bootstrap")
    assert r["auc"]["a"] == pytest.approx(roc_auc_score(y, pa, multi_class="ovr"))
    lo, hi = r["auc"]["ci_difference"]
    assert lo < r["auc"]["difference"] < hi
    json.dumps(r, allow_nan=False)
    same = M.compare_models(y, pa, pa, names, n_boot=100)
    assert same["mcnemar"]["p_value"] == 1.0 and same["auc"]["p_value"] == 1.0


def test_compare_models_binary_uses_delong(pathmnist: dict) -> None:
    y = (pathmnist["y"] == 1).astype(int)
    pa, pb = _binary(pathmnist["stats"], 1), _binary(pathmnist["pool"], 1)
    r = M.compare_models(y, pa, pb, ["other", "background"])
    assert r["auc"]["test"].startswith("DeLong")
    assert r["auc"]["p_value"] == pytest.approx(M.delong_test(y, pa[:, 1], pb[:, 1])["p_value"])


# ----------------------------------------------------------------------------- reports
def _real_history(pathmnist: dict, epochs: int = 4) -> list[dict]:
    """A genuine per-epoch history: an SGD logistic regression trained epoch by epoch."""
    from sklearn.linear_model import SGDClassifier
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    (f_tr, f_te), y_tr, y_te = pathmnist["stats_features"], pathmnist["y_train"], pathmnist["y"]
    scaler = StandardScaler().fit(f_tr)
    f_tr, f_te = scaler.transform(f_tr), scaler.transform(f_te)
    clf = SGDClassifier(loss="log_loss", learning_rate="constant", eta0=0.01, random_state=0)
    history = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        clf.partial_fit(f_tr, y_tr, classes=np.arange(9))
        p_te = clf.predict_proba(f_te)
        history.append({
            "epoch": epoch, "seconds": time.perf_counter() - t0, "lr": 0.01,
            "train_loss": log_loss(y_tr, clf.predict_proba(f_tr), labels=range(9)),
            "val_loss": log_loss(y_te, p_te, labels=range(9)),
            "val_accuracy": accuracy_score(y_te, p_te.argmax(1)),
            "val_auc": roc_auc_score(y_te, p_te, multi_class="ovr"),
        })
    return history


def _assert_png(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        im.load()
        return im.size


def test_write_report_real(pathmnist: dict, tmp_path) -> None:
    y, p, names = pathmnist["y"], pathmnist["stats"], pathmnist["names"]
    metrics = M.compute_metrics(y, p, names, n_boot=200)
    history = _real_history(pathmnist)
    written = write_report(tmp_path / "report", metrics, history, y, p)
    assert sorted(x.name for x in written) == sorted(
        ["metrics.json", "history.csv", "training_curves.png", "confusion_matrix.png",
         "roc_curves.png"])
    assert json.loads((tmp_path / "report" / "metrics.json").read_text()) == metrics
    with open(tmp_path / "report" / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "val_accuracy", "val_auc", "lr",
                             "seconds"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["val_auc"]) == pytest.approx(history[-1]["val_auc"])
    for path in written:
        if path.suffix == ".png":
            width, height = _assert_png(path)
            assert width > 300 and height > 300
    assert not list((tmp_path / "report").glob("*.part"))  # temp files renamed away


def test_write_report_binary_with_absent_class_and_no_history(pathmnist: dict, tmp_path) -> None:
    y = (pathmnist["y"] == 8).astype(int)
    p = _binary(pathmnist["pool"], 8)
    only_negatives = y == 0
    metrics = M.compute_metrics(y[only_negatives], p[only_negatives], ["other", "tumour"],
                                n_boot=50)
    written = write_report(tmp_path, metrics, None, y[only_negatives], p[only_negatives])
    assert {x.name for x in written} == {"metrics.json", "confusion_matrix.png", "roc_curves.png"}
    for path in written[1:]:
        _assert_png(path)


def test_history_columns_are_stable() -> None:
    history = [{"lr": 0.1, "epoch": 1, "extra": 3, "train_loss": 1.0},
               {"epoch": 2, "val_auc": 0.9, "train_loss": 0.5, "lr": 0.1}]
    assert history_columns(history) == ["epoch", "train_loss", "val_auc", "lr", "extra"]


def test_format_metrics_table(pathmnist: dict) -> None:
    y, p, names = pathmnist["y"], pathmnist["stats"], pathmnist["names"]
    m = M.compute_metrics(y, p, names, n_boot=100)
    text = format_metrics_table(m)
    lo, hi = m["ci"]["accuracy"]
    assert f"{m['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]" in text
    assert "balanced accuracy" in text and "AUC" in text
    for name in names:
        line = next(row for row in text.splitlines() if row.startswith(name))
        assert line.split()[-1] == str(m["per_class"][name]["support"])
    sens = m["per_class"]["adipose"]["sensitivity"]
    assert f"{sens:.3f}" in next(r for r in text.splitlines() if r.startswith("adipose"))


def test_report_and_table_for_nested_training_metrics(pathmnist: dict, tmp_path) -> None:
    """``train`` writes {"best_epoch", "validation": compute_metrics(...), "test": ...}."""
    y, names = pathmnist["y"], pathmnist["names"]
    val = M.compute_metrics(y, pathmnist["stats"], names, n_boot=50)
    test = M.compute_metrics(y, pathmnist["pool"], names, n_boot=50)
    nested = {"best_epoch": 3, "validation": val, "test": test}
    written = write_report(tmp_path, nested)
    assert {x.name for x in written} == {"metrics.json", "confusion_matrix.png"}
    _assert_png(tmp_path / "confusion_matrix.png")
    text = format_metrics_table(nested)
    assert "== validation ==" in text and "== test ==" in text
    assert f"{val['accuracy']:.3f}" in text and f"{test['accuracy']:.3f}" in text


def test_issue16_auc_keeps_exact_ties_as_scikit_learn() -> None:
    """metrics rescaled every row to sum to 1, which broke exact ties by rounding noise: macro AUC
    0.375 here against scikit-learn's 0.333 (rows of two-decimal probabilities)."""
    probs = np.array([[0.15, 0.46, 0.39], [0.45, 0.36, 0.19], [0.58, 0.33, 0.09],
                      [0.11, 0.22, 0.67], [0.5, 0.33, 0.17], [0.2, 0.33, 0.47]])
    y = np.array([0, 0, 1, 1, 2, 2])
    want = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert want == pytest.approx(1 / 3)
    m = M.compute_metrics(y, probs, ["a", "b", "c"], n_boot=0)
    assert m["auc"] == want
    for k, name in enumerate(["a", "b", "c"]):
        assert m["per_class"][name]["auc"] == roc_auc_score(y == k, probs[:, k])
