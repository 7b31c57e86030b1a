"""Can the head step itself lower path parity? A parity penalty in the debugged refit, one fold.

Path parity (docs/cv/README.md) is the mean |Δp| between the runtime path (box of the first
pass's segmentation) and the training path (box of the readers' mask). The refitted classifier
leans on the segmentation statistics, which follow the two boxes a little differently. This probe
adds lambda * mean |p_runtime - p_reference| over the training fold's nodules to the refit's
objective (both paths' head inputs, the runtime path's Grad-CAM as shipped) and reports the test
fold's AUC (runtime path), Grad-CAM on the nodule and path parity.

Usage: .venv/bin/python docs/cv/probes/probe_parity_penalty.py K
(needs runs/probes/heads_foldK.npz from probe_attribute_head.py K; writes runs/probes/reference_heads_foldK.npz)
"""
import sys

sys.argv = [sys.argv[0], sys.argv[1] if len(sys.argv) > 1 else "0"]
_src = open(__file__.replace("probe_parity_penalty", "probe_attribute_head")).read()
exec(compile(_src.split("variants = {")[0], "probe_attribute_head.py", "exec"))

import torch  # noqa: E402

from nodule_edge.metrics import roc_auc  # noqa: E402
from nodule_edge.train.head import _cam_region_means  # noqa: E402
from nodule_edge.train.trainer import predict, reference_bounded  # noqa: E402

ref_cache = OUT / f"reference_heads_fold{fold}.npz"
if not ref_cache.exists():
    def reference_inputs(idx):
        out = predict(model, ds, idx, DEVICE, False, images=reference_bounded(ds, idx, spec))
        return out["classifier_input"][:, :width]
    np.savez(ref_cache, fit=reference_inputs(refit_idx), test=reference_inputs(test_idx))
ref = np.load(ref_cache)
x_ref_fit = (torch.from_numpy(ref["fit"].astype(np.float64)) - heads.mean) / heads.sd
x_ref_test = (torch.from_numpy(ref["test"].astype(np.float64)) - heads.mean) / heads.sd


def fit_with_parity(weight):
    # The refit itself (nodule_edge/train/head.py::_fit) with the penalty on the readers'-box inputs.
    fit_data.x_reference = x_ref_fit
    return _fit(heads, fit_data, l2, replace(base, parity_weight=weight), True)


def report(name, p):
    with torch.no_grad():
        logit, _, omega = heads.forward(p, test_data.x)
        inside, outside = _cam_region_means(logit, omega, test_data.features, test_data.f_in, test_data.f_out)
        logit_ref = heads.forward(p, x_ref_test)[0]
        flogit, _, _ = heads.forward(p, fit_data.x)
        flogit_ref = heads.forward(p, x_ref_fit)[0]
    lab = test_data.labelled.numpy()
    y = test_data.y.numpy()[lab]
    auc = roc_auc(y, logit.numpy()[lab])
    auc_ref = roc_auc(y, logit_ref.numpy()[lab])
    parity = float((torch.sigmoid(logit) - torch.sigmoid(logit_ref)).abs().mean())
    fit_parity = float((torch.sigmoid(flogit) - torch.sigmoid(flogit_ref)).abs().mean())
    cam = float((inside > outside).double().mean())
    print(f"{name:28s} test AUC {auc:.3f} (reference box {auc_ref:.3f})  CAM {cam:.3f}  parity {parity:.3f} | fit parity {fit_parity:.3f}", flush=True)


for weight in (0.0, 1.0, 3.0, 10.0):
    report(f"parity weight {weight:g}", fit_with_parity(weight))
