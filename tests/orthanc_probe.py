"""Runs inside a private network namespace (``unshare --net``): a real Orthanc PACS with DICOMweb on
loopback, filled with the given files over its REST API, then ingested by medsilo over QIDO-RS/WADO-RS.

Usage: python tests/orthanc_probe.py FILES_DIR LABELS_CSV WORK_DIR DATASET OUT_JSON
(a segmentation DATASET ignores LABELS_CSV: the DICOM-SEG objects uploaded with the series are the labels)
Orthanc is stopped before this script exits; the namespace dies with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import requests

from client.preprocessing import Preprocessing
from client.site_check import check_source
from common.datasets import DatasetInfo, Task, dataset_info

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
PORT = 8042


def main() -> int:
    files_dir, labels, work, dataset, out = sys.argv[1:6]
    work_dir = Path(work)
    (work_dir / "db").mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "medsilo-test", "HttpPort": PORT, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomServerEnabled": False, "StorageDirectory": str(work_dir / "db"), "IndexDirectory": str(work_dir / "db"),
        "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "HttpCompressionEnabled": False,
    }
    (work_dir / "orthanc.json").write_text(json.dumps(config))
    log = (work_dir / "orthanc.log").open("wb")
    proc = subprocess.Popen(["Orthanc", str(work_dir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{PORT}"
    try:
        for _ in range(200):
            try:
                if requests.get(f"{base}/system", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        else:
            raise RuntimeError("Orthanc did not start; see orthanc.log")
        uploaded = 0
        for f in sorted(Path(files_dir).rglob("*.dcm")):
            r = requests.post(f"{base}/instances", data=f.read_bytes(), timeout=30)
            uploaded += int(r.ok)
        info = dataset_info(dataset)
        if info.task is Task.SEGMENTATION:  # series + DICOM-SEG objects, read through the node's spool
            Path(out).write_text(json.dumps({"uploaded": uploaded, **_segmentation(f"{base}/dicom-web", work_dir,
                                                                                    info)}))
            return 0
        settings = Preprocessing.for_dataset(info.name, size=info.size, channels=info.channels,
                                             spatial_dims=info.spatial_dims)
        check = check_source(f"{base}/dicom-web", settings, state_dir=work_dir / "state", labels=labels,
                             classes=info.labels, multilabel=info.task is Task.MULTILABEL, workers=1)
        again = check_source(f"{base}/dicom-web", settings, state_dir=work_dir / "state", labels=labels,
                             classes=info.labels, workers=1)
        result = check.to_json()
        result["uploaded"] = uploaded
        result["decoded_second_time"] = again.ingested.decoded
        Path(out).write_text(json.dumps(result))
        return 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _segmentation(url: str, work_dir: Path, info: DatasetInfo) -> dict[str, object]:
    from client.pacs import sync
    from client.series import check_folder, local_folder, segmentation_site

    folder, _ = local_folder(url, work_dir / "state")
    train, val = segmentation_site(folder, info)
    again = sync(url, work_dir / "state" / "pacs-spool")
    return {"cases": len(train) + len(val), "voxels": int((train.labels > 0).sum() + (val.labels > 0).sum()),
            "ready": check_folder(folder, info).ready, "fetched_second_time": again.fetched}


if __name__ == "__main__":
    sys.exit(main())
