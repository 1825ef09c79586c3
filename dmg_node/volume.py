"""Series datasets -> one 3D volume with its geometry in patient coordinates (LPS, mm).

Conventions (used by every stage after this one; do not change them locally):

* ``Volume.array`` has shape ``(n_slices, rows, columns)``: the slices stacked in order of
  increasing position along the slice normal ``n = row_cosine x column_cosine``.
* ``Volume.affine`` is a 4x4 matrix mapping a voxel index **(column i, row j, slice k, 1)** to
  DICOM patient coordinates **LPS** in mm (PS3.3 C.7.6.2.1.1)::

      P = affine @ [i, j, k, 1]

  so ``array[k, j, i]`` is the voxel at ``affine @ [i, j, k, 1]``. Note the index order swap
  between the array (k, j, i) and the affine (i, j, k); use :meth:`Volume.patient_to_index`
  and :meth:`Volume.index_to_patient` rather than doing it by hand.
* ``sop_instance_uids[k]`` is the instance that holds slice ``k`` (for an Enhanced MR object,
  the one SOP Instance UID repeated, with ``frame_numbers[k]`` the 1-based frame).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Volume:
    """One series as a 3D array plus its geometry (see the module docstring for conventions)."""

    array: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]
    sop_class_uid: str
    frame_numbers: tuple[int, ...] | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (column i, row j, slice k)."""
        return tuple(float(np.linalg.norm(self.affine[:3, a])) for a in range(3))  # type: ignore[return-value]

    def index_to_patient(self, ijk: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map (i, j, k) voxel indices (..., 3) to LPS patient coordinates (..., 3)."""
        p = np.asarray(ijk, dtype=np.float64)
        return p @ self.affine[:3, :3].T + self.affine[:3, 3]

    def patient_to_index(self, xyz: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map LPS patient coordinates (..., 3) to fractional (i, j, k) voxel indices (..., 3)."""
        p = np.asarray(xyz, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return p @ inv[:3, :3].T + inv[:3, 3]
