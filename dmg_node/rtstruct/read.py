"""RTSTRUCT -> mask: rasterise one ROI's closed-planar contours onto a series' grid.

Used to check what we wrote (tests, the demo) and to read reference contours for training and
evaluation.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import structlog
from pydicom.dataset import Dataset

from dmg_node.errors import RtStructError
from dmg_node.rtstruct.contours import add_crossings
from dmg_node.volume import Volume

log = structlog.get_logger(__name__)


def read_roi_mask(rtstruct: Dataset, volume: Volume, roi_name: str) -> npt.NDArray[np.bool_]:
    """Rasterise the closed-planar contours of one ROI onto *volume*'s grid.

    A voxel is inside when its centre is inside an odd number of the contours of its slice
    (even-odd rule per contour, contours XORed: nested contours are holes, as most TPSs read
    them; for contours written by :func:`build_rtstruct` this equals OR). Each contour is put
    on the nearest slice; contours outside the volume's slices are skipped and logged.

    Raises
    ------
    RtStructError
        If the ROI is missing or ambiguous, or a contour does not lie in one slice plane.
    """
    numbers = [int(item.ROINumber) for item in rtstruct.get("StructureSetROISequence", [])
               if str(item.get("ROIName", "")) == roi_name]
    if len(numbers) != 1:
        raise RtStructError(f"RTSTRUCT must have exactly one ROI named {roi_name!r}; found {len(numbers)}")
    contours = [c for item in rtstruct.get("ROIContourSequence", [])
                if int(item.ReferencedROINumber) == numbers[0] for c in item.get("ContourSequence", [])]
    n_slices, rows, cols = volume.array.shape
    crossings = np.zeros((n_slices, rows, cols + 1), dtype=np.int32)
    for number, contour in enumerate(contours, start=1):
        if contour.get("ContourGeometricType") not in ("CLOSED_PLANAR", "CLOSED_PLANAR_XOR"):
            continue
        points = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64).reshape(-1, 3)
        ijk = volume.patient_to_index(points)
        k = int(np.rint(ijk[:, 2].mean()))
        if np.max(np.abs(ijk[:, 2] - k)) >= 0.5:
            raise RtStructError(
                f"contour {number} of {roi_name!r} spans {np.ptp(ijk[:, 2]):.2f} slices; it must lie in one slice plane"
            )
        if not 0 <= k < n_slices:
            log.warning("contour_outside_volume", roi=roi_name, contour=number, slice=k)
            continue
        add_crossings(crossings[k], ijk[:, :2])
    inside: npt.NDArray[np.bool_] = (np.cumsum(crossings, axis=2)[:, :, :cols] % 2) == 1
    return inside
