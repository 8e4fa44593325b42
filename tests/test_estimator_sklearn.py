"""L2BClassifier as a scikit-learn estimator: clone, Pipeline, cross-validation, grid search, metadata
routing of the trusted set, and sklearn's own check_estimator."""

import numpy as np
import pytest

from l2b import L2BClassifier

sklearn = pytest.importorskip("sklearn")


# ---------------------------------------------------------------- 4. the sklearn estimator



def _features(n=90, seed=0, flip=0.2):
    """Feature vectors (N, 4) of 3 separable classes, labels with ``flip`` of them changed."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 4)) + 3 * np.eye(3, 4)[y]
    noisy = np.where(rng.random(n) < flip, (y + 1) % 3, y)
    return x.astype(np.float32), y, noisy


def test_estimator_is_a_real_sklearn_classifier():
    from sklearn.base import clone, is_classifier
    from sklearn.exceptions import NotFittedError
    from sklearn.model_selection import GridSearchCV, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, noisy = _features()
    clf = L2BClassifier(epochs=3, batch_size=30, pseudo_size=20, device="cpu")
    assert is_classifier(clf) and clone(clf).get_params() == clf.get_params()
    with pytest.raises(NotFittedError):
        clf.predict(x)
    pipe = make_pipeline(StandardScaler(), clf).fit(x, noisy)
    assert pipe.score(x, y) > 0.8 and pipe[-1].n_features_in_ == 4
    with pytest.raises(ValueError, match="expecting 4 features"):
        pipe[-1].predict(x[:, :3])
    with pytest.raises(ValueError):
        L2BClassifier(epochs=1).fit(np.full((6, 4), np.nan), np.arange(6) % 2)
    scores = cross_val_score(clf, x, noisy, cv=2)
    assert scores.shape == (2,) and np.all((0 <= scores) & (scores <= 1))
    grid = GridSearchCV(clf, {"lr": [0.05, 0.1]}, cv=2).fit(x, noisy)
    assert grid.best_params_["lr"] in (0.05, 0.1)


def test_trusted_rows_reach_the_estimator_through_metadata_routing():
    from sklearn import config_context
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, noisy = _features()
    trusted = np.arange(len(y)) % 5 == 0
    labels = np.where(trusted, y, noisy)  # the trusted rows carry their clean label
    with config_context(enable_metadata_routing=True):
        clf = L2BClassifier(epochs=3, batch_size=24, val_batch_size=9, device="cpu").set_fit_request(trusted=True)
        pipe = make_pipeline(StandardScaler(), clf).fit(x, labels, trusted=trusted)
        fitted = pipe[-1]
        # the trusted rows were the clean set (val_acc is measured on them), the others were trained on
        assert fitted.history_[-1]["val_acc"] is not None and len(fitted.per_sample_["index"]) == (~trusted).sum()
        direct = L2BClassifier(**clf.get_params()).fit(StandardScaler().fit_transform(x)[~trusted],
                                                        labels[~trusted],
                                                        StandardScaler().fit(x).transform(x)[trusted], y[trusted])
        np.testing.assert_allclose(pipe.predict_proba(x), direct.predict_proba(StandardScaler().fit(x).transform(x)),
                                   atol=1e-6)
        scores = cross_val_score(pipe, x, labels, cv=2, params={"trusted": trusted})
        assert scores.shape == (2,)
    with pytest.raises(ValueError, match="boolean mask"):
        L2BClassifier(epochs=1).fit(x, labels, trusted=trusted[:5])


def test_check_estimator():
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(L2BClassifier(epochs=3, device="cpu"), on_fail=None)
    failed = {r["check_name"]: repr(r["exception"]) for r in results if r["status"] == "failed"}
    skipped = {r["check_name"] for r in results if r["status"] == "skipped"}
    assert failed == {}
    assert skipped <= {"check_array_api_input"}  # the list in L2BClassifier's docstring
