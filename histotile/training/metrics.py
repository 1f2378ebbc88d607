"""Clinical metrics for patch classifiers, bootstrap confidence intervals, model comparison.

Point estimates come from scikit-learn (accuracy, balanced accuracy, ROC AUC, precision / recall /
F1, confusion matrices). Two pieces have no scikit-learn equivalent and are written here:

* the bootstrap: **stratified** by true class (each resample keeps the class counts of ``y_true``,
  as pROC does for AUC), percentile 95 % intervals. A resample is a vector of multinomial counts,
  and accuracy and (weighted, tie-aware) ROC AUC are evaluated for a block of resamples at once with
  array operations, so 1,000 resamples of 10,000 samples take seconds. With ``stratified=False`` a
  plain bootstrap is used and resamples that miss a class are skipped for AUC.
* DeLong's test for two correlated binary ROC AUCs, in the fast midrank form of Sun & Xu (2014),
  "Fast implementation of DeLong's algorithm for comparing the areas under correlated receiver
  operating characteristic curves", IEEE Signal Processing Letters 21(11).

Everything returned is JSON-able: plain floats, ints and lists; an undefined value is ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from histotile.errors import InvalidArgumentError
from histotile.fileio import json_safe

CI_LEVEL = 0.95
MCNEMAR_EXACT_BELOW = 25  # discordant pairs below this: exact binomial test


# ----------------------------------------------------------------------------- input checks
def _check_inputs(
    y_true: Any, probs: Any, class_names: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validate ``y_true`` (N,) int and ``probs`` (N, C) float64 rows summing to 1 (unchanged)."""
    y = np.asarray(y_true)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:  # a binary positive-class score
        p = np.stack([1.0 - p, p], axis=1)
    names = list(class_names) if class_names is not None else [str(i) for i in range(p.shape[-1])]
    hint = "pass y_true (N,) class indices and probs (N, C) softmax probabilities"
    if y.ndim != 1 or p.ndim != 2 or len(y) != len(p):
        raise InvalidArgumentError(
            f"shapes do not match: y_true {y.shape}, probs {p.shape}", hint, subject="metrics")
    if len(y) == 0:
        raise InvalidArgumentError("no samples to evaluate", hint, subject="metrics")
    if p.shape[1] != len(names) or p.shape[1] < 2:
        raise InvalidArgumentError(
            f"probs has {p.shape[1]} columns for {len(names)} class names", hint, subject="metrics")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise InvalidArgumentError("y_true holds non-integer labels", hint, subject="metrics")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise InvalidArgumentError(
            f"y_true has labels outside 0..{p.shape[1] - 1}", hint, subject="metrics")
    # scikit-learn's own tolerance (its multi-class AUC refuses rows off it). The rows are used
    # as given: rescaling each to sum to 1 broke exact ties by rounding noise (issue 16).
    if not np.all(np.isfinite(p)) or p.min() < 0 or not np.allclose(p.sum(1), 1.0):
        raise InvalidArgumentError(
            "probs are not probabilities (rows must be >= 0 and sum to 1)",
            "apply softmax to the logits first", subject="metrics")
    return y.astype(np.int64), p, names


def _json_float(x: Any) -> float | None:
    """A plain float, or None for nan / inf / missing."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------- point estimates
def _auc_point(y: np.ndarray, p: np.ndarray) -> tuple[float | None, list[float | None]]:
    """sklearn ROC AUC: binary (positive class = column 1) or macro one-vs-rest; plus per class.

    Per-class values are one-vs-rest AUCs (``None`` where a class is absent from ``y``); the
    overall value is ``None`` when any class is absent (macro OvR is then undefined).
    """
    from sklearn.metrics import roc_auc_score

    n_classes = p.shape[1]
    per_class: list[float | None] = []
    for k in range(n_classes):
        pos = y == k
        per_class.append(
            float(roc_auc_score(pos, p[:, k])) if 0 < pos.sum() < len(y) else None)
    present = np.bincount(y, minlength=n_classes) > 0
    if not present.all():
        return None, per_class
    if n_classes == 2:
        return float(roc_auc_score(y, p[:, 1])), per_class
    auc = roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(n_classes)))
    return float(auc), per_class


def _per_class(y: np.ndarray, pred: np.ndarray, names: list[str],
               auc_per_class: list[float | None]) -> dict[str, dict[str, Any]]:
    """Sensitivity, specificity, PPV, NPV, F1, support and OvR AUC for each class (sklearn)."""
    from sklearn.metrics import multilabel_confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(names)))
    prec, rec, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=np.nan)
    mcm = multilabel_confusion_matrix(y, pred, labels=labels)  # (C, 2, 2): [[tn, fp], [fn, tp]]
    out: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(names):
        (tn, fp), (fn, tp) = mcm[k]
        out[name] = {
            "sensitivity": _json_float(rec[k]),
            "specificity": _json_float(tn / (tn + fp)) if tn + fp else None,
            "ppv": _json_float(prec[k]),
            "npv": _json_float(tn / (tn + fn)) if tn + fn else None,
            "f1": _json_float(f1[k]),
            "auc": auc_per_class[k],
            "support": int(support[k]),
            "tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn),
        }
    return out


# ----------------------------------------------------------------------------- bootstrap machinery
def _bootstrap_weights(y: np.ndarray, n_boot: int, rng: np.random.Generator,
                       stratified: bool) -> Iterator[np.ndarray]:
    """Yield blocks (b, N) float64 of resample counts (how often each sample is drawn)."""
    n = len(y)
    block = max(1, 2_000_000 // n)
    members = [np.flatnonzero(y == k) for k in np.unique(y)] if stratified else [np.arange(n)]
    done = 0
    while done < n_boot:
        b = min(block, n_boot - done)
        idx = np.concatenate(
            [m[rng.integers(0, len(m), size=(b, len(m)))] for m in members], axis=1)
        idx += (np.arange(b) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        done += b


def _weighted_auc(pos: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC of ``score`` for the boolean target ``pos`` under each row of weights ``w`` (b, N).

    The Mann-Whitney form with ties counted one half: equals
    ``roc_auc_score(pos, score, sample_weight=w[i])`` for every row (nan where a row has no
    positive or no negative weight).
    """
    order = np.argsort(score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    wo = w[:, order]
    posw = wo * pos[order]
    negw = wo - posw
    if len(starts) < len(s):  # ties: pool each group of equal scores
        posw = np.add.reduceat(posw, starts, axis=1)
        negw = np.add.reduceat(negw, starts, axis=1)
    neg_below = np.cumsum(negw, axis=1) - negw  # negative weight strictly below each group
    num = np.einsum("ij,ij->i", posw, neg_below + 0.5 * negw)
    den = posw.sum(1) * negw.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _weighted_macro_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Binary (column 1) or macro one-vs-rest AUC per weight row; nan if a class is missing."""
    if p.shape[1] == 2:
        return _weighted_auc(y == 1, p[:, 1], w)
    per_class = [_weighted_auc(y == k, p[:, k], w) for k in range(p.shape[1])]
    return np.mean(per_class, axis=0)  # nan propagates: resample missing a class


def _percentile_ci(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    tail = 100 * (1 - CI_LEVEL) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


# ----------------------------------------------------------------------------- public API
def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    n_boot: int = 1000,
    seed: int = 0,
    stratified: bool = True,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, AUC, per-class metrics, confusion matrix and bootstrap CIs.

    ``y_true`` (N,) class indices; ``probs`` (N, C) probabilities (rows sum to 1); the prediction
    is the arg-max. AUC is the ROC AUC of class 1 for two classes, macro one-vs-rest otherwise.
    ``ci`` holds percentile 95 % intervals for accuracy and AUC from ``n_boot`` stratified
    bootstrap resamples (``stratified=False``: plain). ``n_boot=0`` skips the intervals.
    Returns a JSON-able dict; undefined values (e.g. AUC when a class is absent) are ``None``
    and explained in ``notes``.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix

    y, p, names = _check_inputs(y_true, probs, class_names)
    pred = p.argmax(1)
    notes: list[str] = []
    absent = [names[k] for k in range(len(names)) if not np.any(y == k)]
    if absent:
        notes.append(f"classes absent from y_true: {', '.join(absent)}; their sensitivity and "
                     "AUC are undefined (None), and so is the overall AUC")
    auc, auc_per_class = _auc_point(y, p)
    labels = list(range(len(names)))
    out: dict[str, Any] = {
        "n": len(y),
        "class_names": names,
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": _balanced_accuracy_present(y, pred) if absent
        else float(balanced_accuracy_score(y, pred)),
        "auc": auc,
        "auc_kind": "binary ROC AUC (class 1)" if len(names) == 2 else "macro one-vs-rest ROC AUC",
        "per_class": _per_class(y, pred, names, auc_per_class),
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }
    out["ci"], out["bootstrap"] = _bootstrap_ci(y, p, pred, n_boot, seed, stratified, auc, notes)
    out["notes"] = notes
    return json_safe(out)


def _balanced_accuracy_present(y: np.ndarray, pred: np.ndarray) -> float:
    """Balanced accuracy over the classes present in ``y`` (sklearn's definition, no warning)."""
    from sklearn.metrics import recall_score

    present = np.unique(y).tolist()
    return float(recall_score(y, pred, labels=present, average="macro", zero_division=0))


def _bootstrap_ci(
    y: np.ndarray, p: np.ndarray, pred: np.ndarray, n_boot: int, seed: int, stratified: bool,
    auc: float | None, notes: list[str],
) -> tuple[dict[str, list[float] | None], dict[str, Any]]:
    """Percentile CIs for accuracy and AUC, and a description of the bootstrap."""
    info: dict[str, Any] = {
        "method": ("stratified" if stratified else "plain") + " bootstrap, percentile interval",
        "level": CI_LEVEL, "n_boot": int(n_boot), "seed": int(seed),
    }
    if n_boot <= 0:
        return {"accuracy": None, "auc": None}, info
    rng = np.random.default_rng(seed)
    correct = (pred == y).astype(np.float64)
    accs, aucs = [], []
    for w in _bootstrap_weights(y, n_boot, rng, stratified):
        accs.append(w @ correct / len(y))
        aucs.append(_weighted_macro_auc(y, p, w) if auc is not None else np.full(len(w), np.nan))
    auc_vals = np.concatenate(aucs)
    info["n_valid_auc"] = int(np.isfinite(auc_vals).sum())
    if auc is not None and info["n_valid_auc"] < n_boot:
        notes.append(f"{n_boot - info['n_valid_auc']} of {n_boot} bootstrap resamples missed a "
                     "class and were skipped for the AUC interval")
    ci = {"accuracy": _percentile_ci(np.concatenate(accs)), "auc": _percentile_ci(auc_vals)}
    return ci, info


# ----------------------------------------------------------------------------- comparison
def mcnemar_test(correct_a: np.ndarray, correct_b: np.ndarray,
                 exact_below: int = MCNEMAR_EXACT_BELOW) -> dict[str, Any]:
    """McNemar's test on paired per-sample correctness (scipy).

    Exact two-sided binomial test on the discordant pairs when there are fewer than
    ``exact_below`` of them, else the chi-square test with continuity correction.
    """
    from scipy.stats import binomtest, chi2

    a = np.asarray(correct_a, bool)
    b = np.asarray(correct_b, bool)
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    n = only_a + only_b
    out: dict[str, Any] = {"a_correct_b_wrong": only_a, "a_wrong_b_correct": only_b}
    if n == 0:
        return out | {"test": "McNemar (no discordant pairs)", "statistic": None, "p_value": 1.0}
    if n < exact_below:
        p = binomtest(only_a, n, 0.5, alternative="two-sided").pvalue
        return out | {"test": "McNemar exact binomial", "statistic": float(only_a),
                      "p_value": float(p)}
    stat = (abs(only_a - only_b) - 1) ** 2 / n
    return out | {"test": "McNemar chi-square with continuity correction",
                  "statistic": float(stat), "p_value": float(chi2.sf(stat, 1))}


def delong_test(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> dict[str, Any]:
    """DeLong's test for two correlated binary ROC AUCs (fast midrank algorithm, Sun & Xu 2014).

    ``y_true`` is boolean / 0-1 (1 = positive); scores are higher for the positive class.
    Returns both AUCs, their difference, the variance-covariance, z and the two-sided p-value.
    """
    from scipy.stats import norm, rankdata

    y = np.asarray(y_true).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        raise InvalidArgumentError("DeLong's test needs positives and negatives",
                                   "evaluate on data holding both classes", subject="metrics")
    scores = np.stack([np.asarray(score_a, float), np.asarray(score_b, float)])
    x, yneg = scores[:, y], scores[:, ~y]  # positives first, then negatives (Sun & Xu's X, Y)
    tx = rankdata(x, axis=1)  # midranks within positives
    ty = rankdata(yneg, axis=1)  # midranks within negatives
    tz = rankdata(np.concatenate([x, yneg], axis=1), axis=1)  # midranks in the pooled sample
    aucs = tz[:, :m].sum(1) / (m * n) - (m + 1) / (2 * n)
    v10 = (tz[:, :m] - tx) / n  # structural components of the positives
    v01 = 1.0 - (tz[:, m:] - ty) / m  # ... and of the negatives
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = aucs[0] - aucs[1]
    if var <= 1e-15:  # identical rankings
        z, pval = 0.0, 1.0
    else:
        z = diff / math.sqrt(var)
        pval = 2 * norm.sf(abs(z))
    return {"test": "DeLong (fast, Sun & Xu 2014)", "auc_a": float(aucs[0]),
            "auc_b": float(aucs[1]), "difference": float(diff), "z": float(z),
            "p_value": float(pval), "covariance": cov.tolist()}


def paired_bootstrap_auc_test(
    y_true: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray,
    n_boot: int = 2000, seed: int = 0, stratified: bool = True,
) -> dict[str, Any]:
    """Paired bootstrap test of AUC(a) - AUC(b) (binary or macro OvR), the same resamples for both.

    As pROC's ``roc.test(method="bootstrap")``: z = observed difference / SD of the bootstrap
    differences, two-sided normal p-value; also the percentile 95 % interval of the difference.
    """
    from scipy.stats import norm

    y, pa, names = _check_inputs(y_true, probs_a, None)
    _, pb, _ = _check_inputs(y_true, probs_b, names)
    auc_a, _ = _auc_point(y, pa)
    auc_b, _ = _auc_point(y, pb)
    if auc_a is None or auc_b is None:
        raise InvalidArgumentError("AUC is undefined: a class is absent from y_true",
                                   "compare on data holding every class", subject="metrics")
    rng = np.random.default_rng(seed)
    diffs = np.concatenate([
        _weighted_macro_auc(y, pa, w) - _weighted_macro_auc(y, pb, w)
        for w in _bootstrap_weights(y, n_boot, rng, stratified)])
    diffs = diffs[np.isfinite(diffs)]
    diff = auc_a - auc_b
    sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0
    if sd <= 1e-15:
        z, pval = 0.0, 1.0 if abs(diff) <= 1e-15 else 0.0
    else:
        z = diff / sd
        pval = float(2 * norm.sf(abs(z)))
    kind = "stratified" if stratified else "plain"
    return {"test": f"paired {kind} bootstrap (pROC-style z)", "auc_a": auc_a, "auc_b": auc_b,
            "difference": diff, "z": float(z), "p_value": pval, "n_boot": int(n_boot),
            "n_valid": int(len(diffs)), "seed": int(seed), "ci_difference": _percentile_ci(diffs)}


def compare_models(
    y_true: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, class_names: list[str],
    n_boot: int = 2000, seed: int = 0,
) -> dict[str, Any]:
    """Paired comparison of two models on the same samples.

    Accuracy: McNemar's test on per-sample correctness (:func:`mcnemar_test`). AUC: DeLong's test
    for two classes (:func:`delong_test`), a paired bootstrap of the macro one-vs-rest AUC for more
    (:func:`paired_bootstrap_auc_test`). Differences are a - b. JSON-able.
    """
    y, pa, names = _check_inputs(y_true, probs_a, class_names)
    _, pb, _ = _check_inputs(y_true, probs_b, names)
    ca, cb = pa.argmax(1) == y, pb.argmax(1) == y
    out: dict[str, Any] = {
        "n": len(y), "class_names": names,
        "accuracy": {"a": float(ca.mean()), "b": float(cb.mean()),
                     "difference": float(ca.mean() - cb.mean())},
        "mcnemar": mcnemar_test(ca, cb),
        "notes": [],
    }
    auc_a, _ = _auc_point(y, pa)
    auc_b, _ = _auc_point(y, pb)
    if auc_a is None or auc_b is None:
        out["auc"] = {"a": None, "b": None, "difference": None, "test": None, "p_value": None}
        out["notes"].append("AUC comparison skipped: a class is absent from y_true")
    elif len(names) == 2:
        d = delong_test(y == 1, pa[:, 1], pb[:, 1])
        out["auc"] = {"a": d["auc_a"], "b": d["auc_b"], "difference": d["difference"],
                      "test": d["test"], "z": d["z"], "p_value": d["p_value"]}
    else:
        bt = paired_bootstrap_auc_test(y, pa, pb, n_boot=n_boot, seed=seed)
        out["auc"] = {"a": bt["auc_a"], "b": bt["auc_b"], "difference": bt["difference"],
                      "test": bt["test"] + ", macro one-vs-rest AUC", "z": bt["z"],
                      "p_value": bt["p_value"], "ci_difference": bt["ci_difference"],
                      "n_boot": bt["n_boot"]}
    return json_safe(out)
