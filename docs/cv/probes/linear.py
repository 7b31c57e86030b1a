"""Small numpy linear models for the probes (no scikit-learn in the venv): ridge, L2 logistic
regression by Newton steps, patient-grouped folds and an inner-CV grid search; and the pooled
summary line of a linear head's held-out logits."""
import numpy as np
from nodule_edge.metrics import roc_auc


class Ridge:
    def __init__(self, alpha): self.alpha = alpha
    def fit(self, x, y):
        xm, ym = x.mean(0), y.mean()
        xc = x - xm
        self.w = np.linalg.solve(xc.T @ xc + self.alpha * np.eye(x.shape[1]), xc.T @ (y - ym)); self.b = ym - xm @ self.w
        return self
    def predict(self, x): return x @ self.w + self.b


class LogisticRegression:
    """L2-penalised (1 / (2C) |w|^2, as scikit-learn's C) logistic regression by Newton steps."""
    def __init__(self, C=1.0, max_iter=50): self.C, self.max_iter = C, max_iter
    def fit(self, x, y):
        xb = np.c_[x, np.ones(len(x))]; w = np.zeros(xb.shape[1]); reg = np.r_[np.ones(x.shape[1]), 0.0] / self.C
        for _ in range(self.max_iter):
            p = 1 / (1 + np.exp(-xb @ w))
            g = xb.T @ (p - y) + reg * w
            h = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(reg + 1e-9)
            step = np.linalg.solve(h, g); w -= step
            if np.abs(step).max() < 1e-8: break
        self.w = w; return self
    def decision_function(self, x): return np.c_[x, np.ones(len(x))] @ self.w


class GroupKFold:
    def __init__(self, n): self.n = n
    def split(self, x, y, groups):
        uniq = np.unique(groups); rng = np.random.default_rng(0); rng.shuffle(uniq)
        parts = np.array_split(uniq, self.n)
        for part in parts:
            va = np.isin(groups, part); yield np.flatnonzero(~va), np.flatnonzero(va)


def inner_best(make, x, y, groups, grid, score):
    best = None
    for a in grid:
        s = []
        for tr, va in GroupKFold(5).split(x, y, groups):
            s.append(score(y[va], make(a).fit(x[tr], y[tr]), x[va]))
        if best is None or np.mean(s) > best[1]:
            best = (a, float(np.mean(s)))
    return best[0]


def summary_line(name, y, z, zref, cam_on):
    """Pooled runtime-path AUC, readers'-box AUC, path parity (probabilities) and Grad-CAM on the
    nodule (NaN where there is no readers' mask) of held-out logits ``z`` / ``zref``."""
    y, z, zref, cam_on = (np.asarray(v, float) for v in (y, z, zref, cam_on))
    lab = y >= 0
    sig = lambda v: 1 / (1 + np.exp(-v))
    return (f"{name}: runtime AUC {roc_auc(y[lab], z[lab]):.3f}, readers'-box AUC {roc_auc(y[lab], zref[lab]):.3f}, "
            f"path parity {np.abs(sig(z) - sig(zref)).mean():.3f}, CAM on nodule {np.nanmean(cam_on):.3f}")


def out_of_fold(x, y, fold, l2=1.0):
    """Each fold's rows scored by an L2 logistic regression (fit_logistic, inputs standardised on the
    fit rows) fitted on the other folds' rows: a stack over held-out predictions."""
    from nodule_edge.train.head import fit_logistic
    s = np.zeros(len(y))
    for k in np.unique(fold):
        tr, te = fold != k, fold == k
        mu, sd = x[tr].mean(0), x[tr].std(0)
        w, b = fit_logistic((x[tr] - mu) / sd, y[tr], l2)
        s[te] = ((x[te] - mu) / sd) @ w + b
    return s


def paired_interval(y, score, reference, fold, draws=2000, seed=0):
    """95 % paired bootstrap interval of AUC(score) - AUC(reference), nodules resampled within
    folds: nodule-edge cv-compare's own interval."""
    from nodule_edge.train.evaluation import _paired_interval
    return np.array(_paired_interval(roc_auc, y, score, reference, fold, draws, seed))


def logit(p):
    """Log-odds of probabilities, clipped away from 0 and 1."""
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def nested_fit_score(x_fit, y_fit, groups, x_test, grid):
    """An L2 logistic regression (fit_logistic, inputs standardised on the fit rows) with the L2 of
    ``grid`` chosen by 3-fold patient-grouped inner CV on the fit rows, refitted on all of them;
    returns the test rows' logits and the chosen L2."""
    from nodule_edge.train.head import fit_logistic
    best = None
    for l2 in grid:
        s = np.zeros(len(y_fit))
        for tr, va in GroupKFold(3).split(x_fit, y_fit, groups):
            mu, sd = x_fit[tr].mean(0), x_fit[tr].std(0) + 1e-9
            w, b = fit_logistic((x_fit[tr] - mu) / sd, y_fit[tr], l2)
            s[va] = ((x_fit[va] - mu) / sd) @ w + b
        auc = roc_auc(y_fit, s)
        if best is None or auc > best[0]:
            best = (auc, l2)
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-9
    w, b = fit_logistic((x_fit - mu) / sd, y_fit, best[1])
    return ((x_test - mu) / sd) @ w + b, best[1]
