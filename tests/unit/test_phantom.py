"""Tests for dmg_node.phantoms.phantom: synthetic DMG cases, their DICOM studies and NIfTI files."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from scipy import ndimage

from dmg_node.classify import classify, compile_rules, header_from_dataset
from dmg_node.dicomfiles import read_datasets
from dmg_node.phantoms.anatomy import mass_effect, templates
from dmg_node.phantoms.phantom import (
    RAS_TO_LPS,
    PhantomCase,
    StudyManifest,
    axial_grid,
    generate,
    make_case,
    sagittal_grid,
    write_dicom_study,
    write_nifti_case,
)
from dmg_node.phantoms.tumour import SEQUENCES, SITES, draw_signals
from dmg_node.rtstruct import read_roi_mask
from dmg_node.training.data import read_nifti
from dmg_node.volume import Volume, build_volume

RES = 2.0  # test-size case grid
SEEDS = {"pons": 3, "medulla": 2, "thalamus_left": 19}  # what these seeds draw (checked below)
NOMINAL_RAS = {"pons": (0.0, -25.0, -32.0), "medulla": (0.0, -38.0, -50.0), "thalamus_left": (-10.0, -18.0, 6.0)}


@pytest.fixture(scope="module")
def cases() -> dict[str, PhantomCase]:
    return {site: make_case(seed, resolution_mm=RES) for site, seed in SEEDS.items()}


@pytest.fixture(scope="module")
def case(cases: dict[str, PhantomCase]) -> PhantomCase:
    return cases["pons"]


@pytest.fixture(scope="module")
def study(case: PhantomCase, tmp_path_factory: pytest.TempPathFactory) -> StudyManifest:
    return write_dicom_study(case, tmp_path_factory.mktemp("study"), seed=case.seed, geometry="small")


def _series(study: StudyManifest, sequence: str) -> tuple[Volume, npt.NDArray[np.uint8], list[Dataset]]:
    entry = next(s for s in study.series if s.sequence == sequence)
    datasets = read_datasets(sorted((study.study_dir / entry.folder).glob("*.dcm")))
    return build_volume(datasets), np.load(study.study_dir / entry.truth), datasets


def _lps(ras: tuple[float, float, float]) -> npt.NDArray[np.float64]:
    return RAS_TO_LPS[:3, :3] @ np.array(ras)


def _centroid(mask: npt.NDArray[np.generic], affine: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Centroid in world coordinates of a (k, j, i) mask whose affine takes (i, j, k)."""
    ijk = np.argwhere(mask)[:, ::-1].mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


# ------------------------------------------------------------------------------- anatomy


def test_template_arrays_are_the_nilearn_images_in_lps() -> None:
    """The cached template arrays hold nilearn's GM map at the LPS point of each RAS voxel (x and y flipped)."""
    from nilearn import datasets

    img = datasets.load_mni152_gm_template(resolution=1)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    _, gm, _, origin = templates()
    rng = np.random.default_rng(0)
    voxels = rng.integers(0, data.shape, size=(500, 3))
    ras = voxels @ img.affine[:3, :3].T + img.affine[:3, 3]
    lps = ras * np.array([-1.0, -1.0, 1.0])
    zyx = np.round((lps - origin)[:, ::-1]).astype(int)
    assert np.array_equal(gm[tuple(zyx.T)], data[tuple(voxels.T)])
    # The check above can see an anterior-posterior flip; the template is left-right symmetric
    # ("sym"), so a left-right flip shows only in the tumour side (test_tumour_site_and_volume).
    assert not np.array_equal(gm, gm[:, ::-1, :]) and np.array_equal(gm, gm[:, :, ::-1])


@pytest.mark.parametrize("site", ["pons", "medulla", "thalamus"])
def test_nominal_sites_are_brain_tissue(site: str) -> None:
    """Each tumour site's nominal MNI centre lies in grey or white matter of the template."""
    _, gm, wm, origin = templates()
    ras = np.array(SITES[site].centre_ras)
    for x in {ras[0], -ras[0]}:
        zyx = np.round((_lps((x, ras[1], ras[2])) - origin)[::-1]).astype(int)
        assert gm[tuple(zyx)] + wm[tuple(zyx)] > 0.5


def test_mass_effect_pushes_anatomy_outwards() -> None:
    """A voxel at radius r shows what lay at radius (r^3 - R^3)^(1/3) before the tumour grew."""
    shape = (40, 40, 40)
    coarse = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    coords = coarse.copy()
    centre = np.array([20.0, 20.0, 20.0])
    mass_effect(coords, coarse, 1.0, centre, 1.0, 5.0)
    sampled = np.linalg.norm(coords[:, 20, 20, 28] - centre)  # 8 mm from the centre
    assert sampled == pytest.approx((8.0**3 - 5.0**3) ** (1 / 3), abs=1e-3)
    assert np.array_equal(coords[:, 0, 0, 0], coarse[:, 0, 0, 0])  # beyond four push radii: untouched


# ---------------------------------------------------------------------------------- cases


@pytest.mark.slow
def test_same_seed_same_case(case: PhantomCase) -> None:
    """A seed fully determines a case; another seed gives another case."""
    again = make_case(case.seed, resolution_mm=RES)
    for seq in SEQUENCES:
        assert np.array_equal(again.images[seq], case.images[seq])
    assert np.array_equal(again.label, case.label) and np.array_equal(again.affine, case.affine)
    other = make_case(case.seed + 1, resolution_mm=RES)
    assert not np.array_equal(other.images["t2"], case.images["t2"])  # arrays of other shapes are unequal too


def test_case_arrays_follow_the_volume_convention(case: PhantomCase) -> None:
    """Images are float32 12-bit values on an axial LPS grid of the asked spacing; the label is 0/1 uint8."""
    assert np.allclose(case.affine[:3, :3], np.eye(3) * RES)
    for seq in SEQUENCES:
        image = case.images[seq]
        assert image.dtype == np.float32 and image.shape == case.label.shape
        assert image.min() >= 0 and image.max() <= 4095 and np.array_equal(image, np.round(image))
    assert case.label.dtype == np.uint8 and set(np.unique(case.label)) == {0, 1}


@pytest.mark.parametrize("site", list(SEEDS))
def test_tumour_site_and_volume(cases: dict[str, PhantomCase], site: str) -> None:
    """The tumour is drawn at its site (near the nominal MNI centre, on the right side) with a DMG-like volume."""
    c = cases[site]
    assert c.tumour_site == site
    assert 4.5 <= c.tumour_volume_ml <= 42.0
    centroid = _centroid(c.label, c.affine)
    assert np.linalg.norm(centroid - _lps(NOMINAL_RAS[site])) < 25.0
    if site == "thalamus_left":
        assert centroid[0] > 3.0  # LPS +x is the patient's left
    else:
        assert abs(centroid[0]) < 10.0
    assert ndimage.label(c.label)[1] <= 3  # one main mass, perhaps a small satellite


@pytest.mark.parametrize("site", list(SEEDS))
def test_contrasts_are_ordered(cases: dict[str, PhantomCase], site: str) -> None:
    """CSF outshines tumour on T2, tumour outshines CSF on FLAIR, tumour is darker than brain on T1C."""
    c = cases[site]
    t2, flair, t1c = (c.noise_free[s] for s in ("t2", "flair", "t1c"))
    tumour = c.label > 0
    near = ndimage.binary_dilation(tumour, iterations=3)
    csf = (t2 > np.percentile(t2[t2 > 0.05], 99)) & ~near  # the brightest T2 voxels: fluid
    brain = (flair > 0.35) & (t2 < 0.6) & ~near
    assert np.median(t2[csf]) > np.median(t2[tumour]) > np.median(t2[brain])
    assert np.median(flair[tumour]) > 3.0 * np.median(flair[csf])
    assert np.median(flair[tumour]) > np.median(flair[brain])
    assert np.median(t1c[tumour]) < np.median(t1c[brain])


def test_signals_keep_the_task_ordering() -> None:
    """Across many cases the drawn tissue signals keep tumour below CSF on T2, far above it on FLAIR, dark on T1C."""
    t1c, t2, flair = 0, 1, 2
    for seed in range(200):
        s = draw_signals(np.random.default_rng(seed))
        assert s["tumour"][t2] < s["csf"][t2] and s["tumour"][t2] > s["wm"][t2]
        assert s["tumour"][flair] > 5.0 * s["csf"][flair] and s["tumour"][flair] > s["gm"][flair]
        assert s["tumour"][t1c] < s["gm"][t1c] < s["wm"][t1c]


def test_invalid_arguments_are_refused(case: PhantomCase, tmp_path: Path) -> None:
    """Negative seeds, odd resolutions, unknown geometries and formats raise ValueError naming the value."""
    with pytest.raises(ValueError, match="-1"):
        make_case(-1)
    with pytest.raises(ValueError, match="0.1"):
        make_case(1, resolution_mm=0.1)
    with pytest.raises(ValueError, match="huge"):
        write_dicom_study(case, tmp_path, seed=1, geometry="huge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="png"):
        generate(tmp_path, 1, 0, {"png"})
    with pytest.raises(ValueError, match="0"):
        generate(tmp_path, 0, 0, {"nifti"})


def test_test_size_study_takes_a_few_seconds(case: PhantomCase, tmp_path: Path) -> None:
    """A 2 mm case and its small DICOM study take a few seconds of CPU once the anatomy is cached."""
    start = time.process_time()
    write_dicom_study(make_case(7, resolution_mm=RES), tmp_path, seed=7, geometry="small")
    assert time.process_time() - start < 8.0


# ---------------------------------------------------------------------------------- DICOM


EXPECTED_PHYSICS = {
    "t2": {"ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"], "MRAcquisitionType": "2D"},
    "flair": {"ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "SP", "MP"], "RepetitionTime": 9000,
              "EchoTime": 120, "InversionTime": 2500},
    "t1c": {"ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SK", "SP", "MP"], "RepetitionTime": 2000,
            "EchoTime": 3, "InversionTime": 900, "FlipAngle": 9, "MRAcquisitionType": "3D",
            "ContrastBolusAgent": "Gadobutrol", "SeriesDescription": "T1 MPRAGE SAG +C"},
}


@pytest.mark.parametrize("sequence", SEQUENCES)
def test_dicom_series_are_readable_12_bit_mr_images(study: StudyManifest, sequence: str) -> None:
    """Each series reads back as one regular volume of 12-bit MR images with the study's identity and physics."""
    volume, truth, datasets = _series(study, sequence)
    assert volume.array.shape == truth.shape and truth.any()
    assert volume.frame_of_reference_uid == study.frame_of_reference_uid
    assert 0 < volume.array.max() <= 4095 and volume.array.min() >= 0
    assert volume.array[:, :4, :4].mean() > 0  # Rician noise floor in the air
    for ds in datasets:
        assert ds.BitsStored == 12 and ds.HighBit == 11 and ds.BitsAllocated == 16
    ds = datasets[0]
    assert str(ds.StudyInstanceUID) == study.study_instance_uid
    assert str(ds.PatientName) == "PHANTOM^DMG^3" and ds.PatientID == "PH3"
    assert ds.Manufacturer == "dmg-node phantom" and ds.PatientBirthDate
    assert all(str(getattr(ds, k)).startswith("2.25.") for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                                   "SOPInstanceUID", "FrameOfReferenceUID"))
    for keyword, value in EXPECTED_PHYSICS[sequence].items():
        assert getattr(ds, keyword) == value, keyword
    if sequence == "t2":
        assert 4000 <= ds.RepetitionTime <= 6000 and 90 <= ds.EchoTime <= 110
    assert float(ds.SpacingBetweenSlices) == pytest.approx(volume.spacing[2], abs=1e-3)
    label = classify(header_from_dataset(ds, len(datasets)), compile_rules())
    assert label.label == sequence, label.reason


def test_acquisition_grids_are_varied_and_oblique() -> None:
    """Axial stacks are 4-5 mm and usually tilted 5-20 degrees; 3D series are sagittal within 6 degrees."""
    head, tumour = np.zeros(3), np.zeros((1, 3))
    tilts = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        axial = axial_grid(rng, "t2", "T2 TSE AX", "clinical", head, tumour)
        assert axial.shape[1:] == (256, 256) and 22 <= axial.shape[0] <= 40
        assert axial.thickness_mm in (4.0, 5.0) and 0.85 < axial.pixel_mm < 0.95
        tilts.append(np.degrees(np.arccos(abs(axial.axes[2, 2]))))
        sagittal = sagittal_grid(rng, "t1c", "T1 MPRAGE SAG +C", "clinical", head, tumour)
        assert sagittal.shape == (176, 256, 256) and abs(sagittal.axes[0, 2]) > np.cos(np.radians(10))
    tilted = [t for t in tilts if t > 1.0]
    assert 0 < len(tilted) < len(tilts) and all(4.0 < t < 21.0 for t in tilted)


def test_tumour_centroid_agrees_between_dicom_and_nifti(case: PhantomCase, study: StudyManifest,
                                                        tmp_path: Path) -> None:
    """The truth centroid on every DICOM series (LPS) is the NIfTI label centroid (RAS, x and y negated)."""
    folder = write_nifti_case(case, tmp_path)
    img = nib.load(folder / f"{case.case_id}-seg.nii.gz")
    seg = np.asarray(img.dataobj)  # (i, j, k)
    ras = nib.affines.apply_affine(img.affine, np.argwhere(seg).mean(axis=0))
    lps = ras * np.array([-1.0, -1.0, 1.0])
    for sequence in SEQUENCES:
        volume, truth, _ = _series(study, sequence)
        on_series = volume.index_to_patient(np.argwhere(truth)[:, ::-1].mean(axis=0))
        assert np.linalg.norm(on_series - lps) < 1.5, sequence


def test_truth_volume_matches_the_case(case: PhantomCase, study: StudyManifest) -> None:
    """Each series' true mask holds the case's tumour volume (within partial-volume error)."""
    for entry in study.series:
        assert entry.tumour_volume_ml == pytest.approx(case.tumour_volume_ml, rel=0.2)


def test_same_seed_same_files(case: PhantomCase, study: StudyManifest, tmp_path: Path) -> None:
    """Writing a study twice with one seed gives byte-identical files; another seed gives new UIDs."""
    again = write_dicom_study(case, tmp_path / "again", seed=case.seed, geometry="small")

    def digests(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert digests(again.study_dir) == digests(study.study_dir)
    other = write_dicom_study(case, tmp_path / "other", seed=case.seed + 100, geometry="small")
    assert other.study_instance_uid != study.study_instance_uid
    assert {s.series_instance_uid for s in other.series}.isdisjoint(s.series_instance_uid for s in study.series)


def test_manifest_describes_the_study(study: StudyManifest) -> None:
    """manifest.json lists per series its folder, UID, truth file and tumour volume."""
    body = json.loads((study.study_dir / "manifest.json").read_text())
    assert body["study_instance_uid"] == study.study_instance_uid
    assert [s["series_instance_uid"] for s in body["series"]] == [s.series_instance_uid for s in study.series]
    for entry in body["series"]:
        assert (study.study_dir / entry["folder"]).is_dir() and (study.study_dir / entry["truth"]).is_file()
        assert entry["tumour_volume_ml"] > 0 and entry["rtstruct"] is None




def test_reference_rtstruct_holds_the_truth(case: PhantomCase, tmp_path: Path) -> None:
    """With reference_rtstruct, each series gets an RTSTRUCT whose ROI rasterises back to the true mask."""
    study = write_dicom_study(case, tmp_path, seed=case.seed, geometry="small", reference_rtstruct=True)
    for entry in study.series:
        assert entry.rtstruct is not None
        volume, truth, _ = _series(study, entry.sequence)
        rtstruct = pydicom.dcmread(study.study_dir / entry.rtstruct)
        assert np.array_equal(read_roi_mask(rtstruct, volume, "DMG_TRUTH"), truth.astype(bool))


# ---------------------------------------------------------------------------------- NIfTI


def test_nifti_case_layout_and_affine(case: PhantomCase, tmp_path: Path) -> None:
    """NIfTI files follow the challenge layout with a RAS affine, and read back onto the case grid."""
    folder = write_nifti_case(case, tmp_path)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"{case.case_id}-{s}.nii.gz" for s in ("t1c", "t2w", "t2f", "seg"))
    img = nib.load(folder / f"{case.case_id}-t2w.nii.gz")
    assert np.allclose(img.affine, RAS_TO_LPS @ case.affine)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert img.get_data_dtype() == np.int16
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    volume = read_nifti(folder / f"{case.case_id}-t2w.nii.gz")
    assert np.allclose(volume.affine, case.affine) and np.array_equal(volume.array, case.images["t2"])
    seg = read_nifti(folder / f"{case.case_id}-seg.nii.gz")
    assert np.array_equal(seg.array, case.label)


def test_generate_writes_both_formats(tmp_path: Path) -> None:
    """generate() writes case n from seed + n in each asked format and returns the case folders."""
    written = generate(tmp_path, 1, 5, {"nifti", "dicom"}, resolution_mm=RES, geometry="small")
    assert written == [tmp_path / "nifti" / "PH-DMG-00005", tmp_path / "dicom" / "PH-DMG-00005"]
    assert (written[1] / "manifest.json").is_file() and len(list(written[0].glob("*.nii.gz"))) == 4
