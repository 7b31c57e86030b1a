"""Regenerate the golden answers (on purpose only): python tests/golden/regenerate.py"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from nodule_edge.data_paths import lidc_voi_dir

HERE = Path(__file__).parent
DATA = lidc_voi_dir(HERE.parents[1])
VOI_IDS = ["LIDC-IDRI-0001_R_1", "LIDC-IDRI-0004_R_1", "LIDC-IDRI-0005_R_1"]


def _record(nodule) -> dict:
    return {
        "malignancy_probability": nodule.malignancy_probability,
        "attributes": nodule.attributes,
        "volume_mm3": nodule.volume_mm3,
        "nodule_attention": nodule.prediction.nodule_attention,
        "trustworthy": nodule.prediction.trustworthy,
        "similar_top5": [n.id for n in nodule.prediction.similar[:5]],
    }


def main() -> int:
    from nodule_edge.manifest import read_unsure_manifest
    from nodule_edge.runtime import NoduleInferer
    from nodule_edge.runtime.demo import write_demo_study

    inferer = NoduleInferer(backend="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        study, voxel = write_demo_study(Path(tmp) / "study")
        demo = _record(inferer.infer(study, voxels=[voxel]).nodules[0])
    (HERE / "demo.json").write_text(json.dumps(demo, indent=2) + "\n")
    records = {r.id: r for r in read_unsure_manifest(DATA)}
    golden = {}
    for voi_id in VOI_IDS:
        rec = records[voi_id]
        golden[voi_id] = _record(inferer.infer(rec.image_path, worlds=[rec.center_lps_mm]).nodules[0])
    (HERE / "lidc_voi.json").write_text(json.dumps(golden, indent=2) + "\n")
    print("goldens written to", HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
