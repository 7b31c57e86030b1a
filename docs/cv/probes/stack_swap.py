"""Which readers'-mask feature carries the gap between predicted-mask and readers'-mask radiomics?
Swap one predicted feature for the readers' version (and drop one from the readers' set); same nested stacker.
Usage: .venv/bin/python docs/cv/probes/stack_swap.py   Writes stack_swap.json
"""
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import stack as S  # runs stack.py's main table too (cheap)

out = {}
for j, n in enumerate(S.names):
    for tag, x in (("pred_with_reader_" + n, np.c_[S.pred[:, :j], S.reader[:, j:j + 1], S.pred[:, j + 1:]]),
                   ("reader_without_" + n, np.delete(S.reader, j, 1))):
        score = np.full(len(S.idx), np.nan); per = {}
        for k in range(5):
            tr = S.lab & (S.fold != k); te = S.lab & (S.fold == k)
            l2, _ = S.choose_l2(x[tr], S.y[tr], S.fold[tr])
            score[te], _ = S.fit_predict(x[tr], S.y[tr], x[te], l2)
            per[k] = S.roc_auc(S.y[te], score[te])
        out[tag] = {"pooled_auc": S.roc_auc(S.y[S.lab], score[S.lab]), "per_fold": per}
        print(f"{tag:40s} {out[tag]['pooled_auc']:.3f} " + " ".join(f"{v:.3f}" for v in per.values()))
(S.OUT / "stack_swap.json").write_text(json.dumps(out, indent=1))
