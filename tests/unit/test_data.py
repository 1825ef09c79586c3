"""Tests for dmg_node.training.data: NIfTI and DICOM+RTSTRUCT readers and the patch sampler.

Also home of :func:`write_blob_case`, the tiny labelled NIfTI case that the segmentation tests
(train, infer) share: an ellipsoidal "head" with a bright spherical "tumour".
"""

from __future__ import annotations

import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from pydicom.uid import generate_uid

from dmg_node.errors import SeriesError
from dmg_node.rtstruct import RoiSpec, RtStructMeta, build_rtstruct, save_rtstruct
from dmg_node.training.data import (
    PatchSampler,
    PreparedCase,
    array_volume,
    dicom_cases,
    find_cases,
    nifti_cases,
    read_nifti,
    thick_slices,
)
from dmg_node.volume import build_volume
from tests.support import mr_dataset

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def blob_arrays(seed: int, shape: tuple[int, int, int] = (36, 48, 48), spacing: float = 3.0) -> tuple[
    np.ndarray, np.ndarray, np.ndarray
]:
    """(image, label, LPS affine) of a blob case in the Volume convention."""
    rng = np.random.default_rng(seed)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -np.array(shape[::-1]) * spacing / 2
    k, j, i = np.indices(shape)
    lps = np.stack([i, j, k], axis=-1) @ affine[:3, :3].T + affine[:3, 3]
    head = ((lps / np.array([60.0, 70.0, 50.0])) ** 2).sum(-1) < 1
    centre = rng.uniform(-20, 20, 3)
    tumour = (((lps - centre) ** 2).sum(-1) < rng.uniform(10, 15) ** 2) & head
    image = np.where(head, 100.0, 0.0) + np.where(tumour, 80.0, 0.0) + rng.normal(0, 5, shape)
    return image.astype(np.float32), tumour, affine


def write_blob_case(root: Path, case_id: str, seed: int, suffixes: tuple[str, ...] = ("t2w",)) -> None:
    """Write one blob case in the NIfTI challenge layout under ``root/case_id``."""
    image, label, affine = blob_arrays(seed)
    folder = root / case_id
    folder.mkdir(parents=True)
    ras = RAS_TO_LPS @ affine
    for suffix in suffixes:
        nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), ras), folder / f"{case_id}-{suffix}.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint8).transpose(2, 1, 0), ras), folder / f"{case_id}-seg.nii.gz")


def test_nifti_is_read_into_the_lps_volume_convention(tmp_path: Path) -> None:
    """A NIfTI voxel (i, j, k) at RAS x lands at array[k, j, i] with LPS -x."""
    data = np.zeros((5, 6, 7), dtype=np.float32)  # NIfTI order (i, j, k)
    data[1, 2, 3] = 1.0
    ras = np.diag([2.0, 3.0, 4.0, 1.0])
    ras[:3, 3] = [10.0, 20.0, 30.0]
    nib.save(nib.Nifti1Image(data, ras), tmp_path / "x.nii.gz")
    volume = read_nifti(tmp_path / "x.nii.gz")
    assert volume.array.shape == (7, 6, 5)
    assert volume.array[3, 2, 1] == 1.0
    np.testing.assert_allclose(volume.index_to_patient([1, 2, 3]), [-12.0, -26.0, 42.0])


def test_nifti_cases_pair_the_sequence_with_its_label(tmp_path: Path) -> None:
    """Only folders holding both the sequence image and the -seg label are cases."""
    write_blob_case(tmp_path, "A", 1, ("t2w", "t2f"))
    write_blob_case(tmp_path, "B", 2, ("t1c",))
    assert [c.case_id for c in nifti_cases(tmp_path, "t2")] == ["A"]
    assert [c.case_id for c in nifti_cases(tmp_path, "flair")] == ["A"]
    case = nifti_cases(tmp_path, "t1c")[0].load()
    assert case.label.dtype == bool and case.label.shape == case.image.array.shape and case.label.any()


def test_empty_folder_is_refused_with_the_expected_layout(tmp_path: Path) -> None:
    """A folder without labelled cases raises SeriesError naming the layout."""
    with pytest.raises(SeriesError, match="t2w.nii.gz"):
        find_cases(tmp_path, "t2")


def test_label_on_another_grid_is_refused(tmp_path: Path) -> None:
    """A label whose grid differs from the image's is refused."""
    write_blob_case(tmp_path, "A", 1)
    seg = tmp_path / "A" / "A-seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), seg)
    with pytest.raises(SeriesError, match="share the image grid"):
        nifti_cases(tmp_path, "t2")[0].load()


def test_dicom_series_with_rtstruct_becomes_a_case(tmp_path: Path) -> None:
    """An RTSTRUCT's matching ROIs are rasterised onto the referenced series, if of the sequence."""
    study, series = generate_uid(), generate_uid()
    datasets = [mr_dataset(study, series, k, rows=32, cols=32) for k in range(6)]
    for ds in datasets:
        ds.save_as(tmp_path / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    volume = build_volume(datasets)
    mask = np.zeros(volume.array.shape, dtype=bool)
    mask[2:4, 10:20, 12:22] = True
    meta = RtStructMeta(generate_uid(), generate_uid(), datetime.datetime(2026, 1, 1, 12, 0))
    rt = build_rtstruct(datasets, volume, mask, RoiSpec("GTV_DMG", (255, 0, 0), "test"), meta)
    save_rtstruct(rt, tmp_path / "rt.dcm")
    assert dicom_cases(tmp_path, "t1c", roi_pattern=r"GTV") == []
    (case,) = dicom_cases(tmp_path, "t2", roi_pattern=r"GTV")
    loaded = case.load()
    assert loaded.image.series_instance_uid == series
    np.testing.assert_array_equal(loaded.label, mask)
    with pytest.raises(SeriesError, match="no ROI matching"):
        dicom_cases(tmp_path, "t2", roi_pattern=r"^CTV")[0].load()


def test_array_volume_has_one_placeholder_uid_per_slice() -> None:
    """array_volume builds a valid Volume from a bare array and affine."""
    volume = array_volume(np.zeros((3, 4, 5)), np.eye(4), "x")
    assert volume.sop_instance_uids == ("", "", "") and volume.array.dtype == np.float32


def test_sampler_centres_patches_on_tumour_and_is_seeded() -> None:
    """Patches have the requested size, often contain tumour, and repeat for the same seed."""
    image = np.zeros((40, 40, 40), np.float32)
    label = np.zeros_like(image)
    label[30:34, 5:9, 20:24] = 1.0
    cases = [PreparedCase("a", image, label)]
    x1, y1 = PatchSampler(cases, (16, 16, 16), 0.9, seed=3).batch(8)
    x2, _ = PatchSampler(cases, (16, 16, 16), 0.9, seed=3).batch(8)
    assert x1.shape == (8, 1, 16, 16, 16) and torch.equal(x1, x2)
    assert int((y1.flatten(1).amax(1) > 0).sum()) >= 5


def test_thick_slices_blur_along_s_only_and_keep_shape() -> None:
    """A thick-slice view smooths an edge across slices, leaves in-plane detail and constant columns alone."""
    edge = np.zeros((40, 6, 6), np.float32)
    edge[20:] = 1.0
    out = thick_slices(edge, 3.0, 1.0)
    assert out.shape == edge.shape and out.dtype == np.float32
    column = out[:, 0, 0]
    assert np.all(np.diff(column) >= -1e-6) and column[0] == 0 and column[-1] == 1  # monotone, ends kept
    assert 2 <= int(((column > 0.01) & (column < 0.99)).sum()) <= 6  # the edge spreads over about a slice
    pattern = np.random.default_rng(0).random((1, 6, 6)).astype(np.float32).repeat(40, 0)
    np.testing.assert_allclose(thick_slices(pattern, 3.3, 0.5), pattern, atol=1e-6)
    assert not np.allclose(thick_slices(pattern, 3.3, 0.5, inplane_sigma=0.6), pattern, atol=1e-3)


def test_sampler_thick_fraction_changes_patches_but_not_labels() -> None:
    """With thick_fraction=1 every image patch is degraded; the label is the true one."""
    rng = np.random.default_rng(1)
    image = rng.normal(size=(40, 40, 40)).astype(np.float32)
    label = np.zeros_like(image)
    label[15:25, 15:25, 15:25] = 1.0
    cases = [PreparedCase("a", image, label)]
    x0, _ = PatchSampler(cases, (16, 16, 16), 0.9, seed=3).batch(4)
    x1, y1 = PatchSampler(cases, (16, 16, 16), 0.9, seed=3, thick_fraction=1.0, spacing_mm=1.5).batch(4)
    assert x1.shape == x0.shape and not torch.equal(x0, x1)
    assert float(x1.std()) < float(x0.std())  # averaging across slices removes noise
    assert set(np.unique(y1.numpy())) <= {0.0, 1.0}
