"""RTSTRUCTs we write, read back by independent readers: plastimatch rasterises them to the mask we wrote and dciodvfy finds no errors."""

from __future__ import annotations

import subprocess
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dmg_node.rtstruct import (
    build_rtstruct,
    save_rtstruct,
)
from dmg_node.volume import Volume, build_volume
from tests.support import require_tool
from tests.unit.test_rtstruct import (
    GEOMETRIES,
    META,
    ROI,
    build,
    dciodvfy,
    dice,
    make_series,
    tumour,
    write_checked,
)


def read_mha(path: Path) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64]]:
    """A tiny MetaImage reader: the (z, y, x) array and the 4x4 map from (x, y, z) index to LPS."""
    raw = path.read_bytes()
    end = raw.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    header = dict(line.split(" = ", 1) for line in raw[:end].decode().splitlines())
    assert header["ElementType"] == "MET_UCHAR", header
    dims = [int(v) for v in header["DimSize"].split()]
    data = raw[end:]
    if header.get("CompressedData") == "True":
        data = zlib.decompress(data)
    array = np.frombuffer(data, dtype=np.uint8).reshape(dims[::-1])
    affine = np.eye(4)
    direction = np.asarray([float(v) for v in header["TransformMatrix"].split()]).reshape(3, 3)
    affine[:3, :3] = direction.T * np.asarray([float(v) for v in header["ElementSpacing"].split()])
    affine[:3, 3] = [float(v) for v in header["Offset"].split()]
    return array, affine


def plastimatch_mask(series: list[Dataset], rtstruct: Dataset, volume: Volume, tmp_path: Path) -> npt.NDArray[np.bool_]:
    """Write series + RTSTRUCT, let plastimatch rasterise the ROI, resample it onto *volume*'s voxel centres."""
    series_dir = tmp_path / "series"
    series_dir.mkdir()
    for n, ds in enumerate(series):
        ds.save_as(series_dir / f"{n:03d}.dcm", enforce_file_format=True)
    rt_path = tmp_path / "rt.dcm"
    save_rtstruct(rtstruct, rt_path)
    dciodvfy(rt_path)
    out = tmp_path / "out"
    proc = subprocess.run(
        [require_tool("plastimatch"), "convert", "--input", str(rt_path), "--referenced-ct", str(series_dir),
         "--output-prefix", str(out), "--prefix-format", "mha"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    array, affine = read_mha(out / f"{ROI.name}.mha")
    k, j, i = np.indices(volume.array.shape)
    xyz = volume.index_to_patient(np.stack([i, j, k], axis=-1))
    index = np.rint((xyz - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T).astype(int)
    inside = np.all((index >= 0) & (index < np.asarray(array.shape[::-1])), axis=-1)
    index = np.where(inside[..., None], index, 0)
    back: npt.NDArray[np.bool_] = inside & (array[index[..., 2], index[..., 1], index[..., 0]] > 0)
    return back


def assert_matches(back: npt.NDArray[np.bool_], mask: npt.NDArray[np.bool_]) -> None:
    """Dice >= 0.97 (the brief's bar) and at most 0.1 % of the mask's voxels differing (we expect none)."""
    assert dice(back, mask) >= 0.97, dice(back, mask)
    assert np.count_nonzero(back ^ mask) <= np.count_nonzero(mask) // 1000, np.count_nonzero(back ^ mask)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_plastimatch_reads_back_the_mask(name: str, tmp_path: Path) -> None:
    """plastimatch rasterises the RTSTRUCT onto the source series and gives the mask back, unmirrored."""
    series, volume, mask, rt = build(GEOMETRIES[name])
    assert_matches(plastimatch_mask(series, rt, volume, tmp_path), mask)


@pytest.mark.parametrize("name", ["non_square", "oblique", "sagittal"])
def test_plastimatch_keeps_the_hole_and_the_island_in_it(name: str, tmp_path: Path) -> None:
    """A ring around a hole holding an island comes back through plastimatch's default reader with the hole empty."""
    geo = GEOMETRIES[name]
    mask = tumour((geo.n_slices, geo.rows, geo.columns), hole=True)
    series, volume, mask, rt = build(geo, mask)
    back = plastimatch_mask(series, rt, volume, tmp_path)
    k, j, i = np.indices(mask.shape)
    hole: npt.NDArray[np.bool_] = np.abs(j - geo.rows * 0.45) < geo.rows * 0.12 - 1
    hole &= np.abs(i - geo.columns * 0.55) < geo.columns * 0.1 - 1
    hole &= ~mask & np.any(mask, axis=(1, 2), keepdims=True)
    assert hole.sum() > 100 and not back[hole].any()
    assert_matches(back, mask)


@pytest.mark.parametrize("name", ["oblique", "sagittal"])
def test_plastimatch_reads_back_speckle(name: str, tmp_path: Path) -> None:
    """Random speckle (corner contacts, many holes, islands in holes) survives plastimatch's default reader."""
    geo = replace(GEOMETRIES[name], rows=24, columns=20, n_slices=4)
    mask = np.random.default_rng(3).random((4, 24, 20)) < 0.55
    series, volume, mask, rt = build(geo, mask)
    assert_matches(plastimatch_mask(series, rt, volume, tmp_path), mask)


def test_written_file_passes_dciodvfy_with_valid_values(tmp_path: Path) -> None:
    """The file passes dciodvfy (also as Explicit VR); DS values fit 16 characters; point counts are integers >= 3."""
    rt = build(GEOMETRIES["oblique"])[3]
    back = write_checked(rt, tmp_path)
    assert back.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    explicit = tmp_path / "explicit.dcm"
    back.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    back.save_as(explicit, enforce_file_format=True)  # as a C-STORE in Explicit VR would encode it
    dciodvfy(explicit)
    raw = (tmp_path / "rt.dcm").read_bytes()
    for elem in back.iterall():
        if elem.VR == "DS":
            for value in elem.value if elem.VM > 1 else [elem.value]:
                assert len(value.original_string) <= 16
    for contour in back.ROIContourSequence[0].ContourSequence:
        assert isinstance(contour.NumberOfContourPoints, int) and contour.NumberOfContourPoints >= 3
        assert len(contour.ContourData) == 3 * contour.NumberOfContourPoints
    assert b"Qurit" not in raw and b"rt-utils" not in raw


def test_empty_mask_allowed_writes_roi_without_contours(tmp_path: Path) -> None:
    """With allow_empty the ROI is written with no Contour Sequence, and the file passes dciodvfy."""
    series = make_series(GEOMETRIES["axial"])
    volume = build_volume(series)
    ds = build_rtstruct(series, volume, np.zeros(volume.array.shape, dtype=bool), ROI, META, allow_empty=True)
    assert "ContourSequence" not in ds.ROIContourSequence[0]
    assert ds.RTROIObservationsSequence[0].RTROIInterpretedType == "GTV"
    write_checked(ds, tmp_path, "empty.dcm")
