"""RTSTRUCT (RT Structure Set IOD, PS3.3 A.19): build one from a mask, read one back to a mask; and the SEG.

- :mod:`.build`: mask + source series -> RTSTRUCT dataset, and writing it atomically.
- :mod:`.contours`: exact voxel-edge tracing of a mask slice into closed planar polygons.
- :mod:`.read`: RTSTRUCT ROI -> mask on a series' grid.
- :mod:`.seg`: mask + source series -> DICOM Segmentation (PS3.3 A.51), the optional second output.
"""

from dmg_node.rtstruct.build import RoiSpec, RtStructMeta, build_rtstruct, save_rtstruct
from dmg_node.rtstruct.read import read_roi_mask
from dmg_node.rtstruct.seg import SegMeta, build_seg

__all__ = ["RoiSpec", "RtStructMeta", "build_rtstruct", "SegMeta", "build_seg", "read_roi_mask", "save_rtstruct"]
