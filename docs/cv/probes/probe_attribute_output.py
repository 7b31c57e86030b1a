import sys
sys.argv = ["x", "0"]
__file__ = "/work/main/docs/cv/probes/probe_attribute_head.py"
exec(open(__file__).read().split("variants = {")[0])
import torch, torch.nn.functional as F
def out_only(p0, weight, steps=300, l2=0.01, l1=False):
    p = {k: v.clone() for k, v in p0.items()}
    wo, bo = p["Wo"].clone().requires_grad_(True), p["bo"].clone().requires_grad_(True)
    opt = torch.optim.Adam([wo, bo], lr=0.01)
    m = fit_data.has_attributes
    with torch.no_grad():
        emb = F.relu(fit_data.x @ p["We"].T + p["be"])
    for _ in range(steps):
        a = torch.sigmoid(emb @ wo.T + bo)
        err = F.l1_loss if l1 else F.mse_loss
        loss = weight * err(a[m], fit_data.attributes[m][:, : a.shape[1]]) + l2 * (wo ** 2).sum()
        opt.zero_grad(); loss.backward(); opt.step()
    p["Wo"], p["bo"] = wo.detach(), bo.detach()
    return p
shipped = _fit(heads, fit_data, l2, base, True)
for name, p in [("shipped", shipped), ("shipped + output layer w16", out_only(shipped, 16.0)), ("shipped + output layer w16 1000 steps", out_only(shipped, 16.0, 1000)), ("shipped + output layer w16 l2 0.001", out_only(shipped, 16.0, 1000, 0.001)), ("shipped + output layer L1 w4", out_only(shipped, 4.0, 1000, 0.01, True)), ("shipped + output layer L1 w4 l2 0.001", out_only(shipped, 4.0, 1000, 0.001, True))]:
    t, f = _head_metrics(heads, p, test_data), _head_metrics(heads, p, fit_data)
    print(f"{name:45s} test MAE {t['attribute_mae']:.3f} ({1 - t['attribute_mae'] / const_mae:.1%} below)  AUC {t['auc']:.3f} CAM {t['cam_on_nodule_fraction']:.3f} | fit MAE {f['attribute_mae']:.3f}")
