"""Can the attribute output read more than the 64-d embedding? Readout variants on one fold.

The shipped readout step (nodule_edge/train/head.py::_fit_attribute_readout) refits the 64 -> 6
attribute output layer on the embedding the classifier also reads. This probe adds a second,
direct path from the standardised head input (pooled features + segmentation statistics) to the
six attribute logits, fitted under the same L1 objective, and reports the test-fold MAE.
Malignancy is untouched by every variant (nothing else reads the attribute outputs).

Usage: .venv/bin/python docs/cv/probes/probe_attribute_direct.py K
(needs runs/probes/heads_foldK.npz from probe_attribute_head.py K)
"""
import sys

sys.argv = [sys.argv[0], sys.argv[1] if len(sys.argv) > 1 else "0"]
_src = open(__file__.replace("probe_attribute_direct", "probe_attribute_head")).read()
exec(compile(_src.split("variants = {")[0], "probe_attribute_head.py", "exec"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nodule_edge.train.head import _fit_attribute_readout, RATING_SPAN  # noqa: E402


def direct_readout(params, data, l2_direct, l2_out=0.01, steps=1000, with_embedding=True):
    m = data.has_attributes
    with torch.no_grad():
        emb = F.relu(data.x[m] @ params["We"].T + params["be"])
    target = data.attributes[m][:, : params["Wo"].shape[0]]
    wo = params["Wo"].clone().requires_grad_(True)
    bo = params["bo"].clone().requires_grad_(True)
    wd = torch.zeros(wo.shape[0], data.x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([wo, bo, wd], lr=0.01)
    x = data.x[m]
    for _ in range(steps):
        z = x @ wd.T + bo + (emb @ wo.T if with_embedding else 0)
        loss = RATING_SPAN * F.l1_loss(torch.sigmoid(z), target) + l2_out * (wo ** 2).sum() + l2_direct * (wd ** 2).sum()
        opt.zero_grad(); loss.backward(); opt.step()
    return wo.detach(), bo.detach(), wd.detach(), with_embedding


def mae(params, readout, data):
    wo, bo, wd, with_embedding = readout
    m = data.has_attributes
    emb = F.relu(data.x[m] @ params["We"].T + params["be"])
    z = data.x[m] @ wd.T + bo + (emb @ wo.T if with_embedding else 0)
    return float((torch.sigmoid(z) - data.attributes[m][:, : wo.shape[0]]).abs().mean() * RATING_SPAN)


joint = _fit(heads, fit_data, l2, base, True)
shipped = _fit_attribute_readout(heads, joint, fit_data, replace(base, attribute_readout=True))
zero = torch.zeros(6, fit_data.x.shape[1], dtype=torch.float64)
rows = [("shipped readout (embedding only)", (shipped["Wo"], shipped["bo"], zero, True))]
for l2d in (0.1, 0.03, 0.01, 0.003, 0.001, 0.0003, 0.0):
    rows.append((f"embedding + direct, direct L2 {l2d}", direct_readout(joint, fit_data, l2d)))
for l2d in (0.03, 0.01, 0.003):
    rows.append((f"direct only, L2 {l2d}", direct_readout(joint, fit_data, l2d, with_embedding=False)))
for name, r in rows:
    t, f = mae(joint, r, test_data), mae(joint, r, fit_data)
    print(f"{name:40s} test MAE {t:.3f} ({1 - t / const_mae:.1%} below const) | fit MAE {f:.3f}", flush=True)
print("constant test MAE", round(const_mae, 3))
