"""Tests for dmg_node.classify: a labelled corpus of vendor-style headers, header reading, rules, choose()."""

from __future__ import annotations

import dataclasses
import io
import re
from typing import Any

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    MRSpectroscopyStorage,
    SecondaryCaptureImageStorage,
)

from dmg_node.classify import (
    DEFAULT_PATTERNS,
    Choice,
    Classification,
    Label,
    SeriesHeader,
    choose,
    classify,
    compile_rules,
    header_from_dataset,
    header_from_series,
)

RULES = compile_rules()
ORIGINAL = ("ORIGINAL", "PRIMARY", "M", "ND")

# Physics presets (ms, degrees) typical of each sequence on 1.5/3 T scanners.
T2_TSE = dict(scanning_sequence=("SE",), sequence_variant=("SK", "SP"), repetition_time=5000.0, echo_time=100.0)
T2_3D = dict(T2_TSE, sequence_variant=("SK", "SP", "OSP"), repetition_time=3200.0, echo_time=409.0,
             mr_acquisition_type="3D")  # fmt: skip
FLAIR_2D = dict(scanning_sequence=("SE", "IR"), sequence_variant=("SK", "SP", "MP"), repetition_time=9000.0,
                echo_time=120.0, inversion_time=2500.0, mr_acquisition_type="2D")  # fmt: skip
FLAIR_3D = dict(FLAIR_2D, repetition_time=5000.0, echo_time=387.0, inversion_time=1800.0, mr_acquisition_type="3D")
CUBE_FLAIR = dict(FLAIR_3D, repetition_time=6002.0, echo_time=135.0, inversion_time=1873.0)
VISTA_FLAIR = dict(FLAIR_3D, scanning_sequence=("IR",), repetition_time=4800.0, echo_time=340.0, inversion_time=1650.0)
MPRAGE = dict(scanning_sequence=("GR", "IR"), sequence_variant=("SK", "SP", "MP"), repetition_time=2300.0,
              echo_time=2.3, inversion_time=900.0, flip_angle=8.0, mr_acquisition_type="3D")  # fmt: skip
BRAVO = dict(scanning_sequence=("GR",), sequence_variant=("SS", "SK"), repetition_time=8.2, echo_time=3.2,
             inversion_time=450.0, flip_angle=12.0, mr_acquisition_type="3D")  # fmt: skip
FSPGR = dict(BRAVO, inversion_time=None, repetition_time=7.8, echo_time=3.0, flip_angle=15.0)
TFE = dict(scanning_sequence=("GR",), sequence_variant=("SK",), repetition_time=8.1, echo_time=3.7, flip_angle=8.0,
           mr_acquisition_type="3D")  # fmt: skip
VIBE = dict(TFE, sequence_variant=("SK", "SP", "OSP"), repetition_time=4.9, echo_time=2.0, flip_angle=9.0)
T1_SE = dict(scanning_sequence=("SE",), sequence_variant=("SK", "SP"), repetition_time=500.0, echo_time=10.0,
             flip_angle=90.0, mr_acquisition_type="2D")  # fmt: skip
T1_FLAIR = dict(FLAIR_2D, repetition_time=2200.0, echo_time=12.0, inversion_time=860.0)
STIR = dict(FLAIR_2D, repetition_time=4000.0, echo_time=60.0, inversion_time=160.0)
PD = dict(T2_TSE, repetition_time=3000.0, echo_time=12.0)
T2STAR = dict(scanning_sequence=("GR",), sequence_variant=("SP",), repetition_time=650.0, echo_time=20.0,
              flip_angle=20.0, mr_acquisition_type="2D")  # fmt: skip
SWI = dict(T2STAR, repetition_time=28.0, echo_time=20.0, flip_angle=15.0, mr_acquisition_type="3D")
TOF = dict(T2STAR, sequence_variant=("SK", "SP", "MTC"), repetition_time=22.0, echo_time=3.5, flip_angle=18.0,
           mr_acquisition_type="3D")  # fmt: skip
BSSFP = dict(TOF, sequence_variant=("SK",), repetition_time=5.0, echo_time=2.5, flip_angle=55.0)
MP2RAGE_INV2 = dict(MPRAGE, repetition_time=5000.0, echo_time=2.9, inversion_time=2500.0, flip_angle=4.0)
DWI = dict(scanning_sequence=("EP",), sequence_variant=("SK", "SP"), repetition_time=5000.0, echo_time=90.0)
PHILIPS_DWI = dict(scanning_sequence=("SE",), sequence_variant=("SK",), repetition_time=3000.0, echo_time=80.0,
                   diffusion_b_value=1000.0)  # fmt: skip
DSC = dict(scanning_sequence=("GR", "EP"), repetition_time=1500.0, echo_time=30.0, flip_angle=90.0,
           temporal_positions=50)  # fmt: skip
DCE = dict(VIBE, repetition_time=4.0, echo_time=1.5, flip_angle=15.0, temporal_positions=40)
LOCALIZER = dict(scanning_sequence=("GR",), sequence_variant=("SP",), repetition_time=8.6, echo_time=4.0,
                 flip_angle=20.0, mr_acquisition_type="2D")  # fmt: skip
# What the phantom generator (dmg_node/phantoms/phantom.py) writes.
PHANTOM_T2 = dict(T2_TSE, scan_options=("PFP",), repetition_time=4500.0, echo_time=100.0, mr_acquisition_type="2D")
PHANTOM_FLAIR = dict(scanning_sequence=("SE", "IR"), repetition_time=9000.0, echo_time=120.0, inversion_time=2500.0)
PHANTOM_T1C = dict(MPRAGE, repetition_time=2000.0, echo_time=3.0, inversion_time=900.0, flip_angle=9.0,
                   contrast_bolus_agent="Gadobutrol")  # fmt: skip
GD = dict(contrast_bolus_agent="Gadovist", contrast_bolus_route="IV", contrast_bolus_volume=7.5)

UID_ROOT = "1.2.826.0.1.3680043.8.498.424242"


def mr(desc: str | None, physics: dict[str, Any] | None = None, **extra: Any) -> SeriesHeader:
    """An ORIGINAL MR Image Storage series header with *desc* and the given physics."""
    values: dict[str, Any] = dict(
        series_instance_uid=f"{UID_ROOT}.1", modality="MR", sop_class_uid=MRImageStorage, image_type=ORIGINAL,
        series_description=desc,
    )  # fmt: skip
    values.update(physics or {})
    values.update(extra)
    return SeriesHeader(**values)


T2, FLAIR, T1C, NONE = Label.T2, Label.FLAIR, Label.T1C, Label.NONE
CORPUS = [
    # --- t2 ---------------------------------------------------------------------------------
    pytest.param(mr("t2_tse_tra_p2", T2_TSE, manufacturer="SIEMENS"), T2, id="siemens-t2-tse"),
    pytest.param(mr("t2_tse_tra_blade", T2_TSE), T2, id="siemens-t2-blade"),
    pytest.param(mr("t2_spc_sag_p2_iso", T2_3D), T2, id="siemens-t2-space-3d"),
    pytest.param(mr("Ax T2 FRFSE", T2_TSE, manufacturer="GE MEDICAL SYSTEMS"), T2, id="ge-t2-frfse"),
    pytest.param(mr("Ax T2 PROPELLER", T2_TSE), T2, id="ge-t2-propeller"),
    pytest.param(mr("Sag CUBE T2", T2_3D), T2, id="ge-cube-t2"),
    pytest.param(mr("T2W_TSE", T2_TSE, manufacturer="Philips"), T2, id="philips-t2w-tse"),
    pytest.param(mr("3D_T2W_VISTA", T2_3D), T2, id="philips-t2-vista"),
    pytest.param(mr("T2W_FSE_AX", T2_TSE, manufacturer="CANON_MEC"), T2, id="canon-t2w-fse"),
    pytest.param(mr("t2_fse_tra", T2_TSE, manufacturer="UIH"), T2, id="uih-t2-fse"),
    pytest.param(mr("轴位T2WI", T2_TSE), T2, id="chinese-t2wi-axial"),
    pytest.param(mr("T2WI压脂", dict(T2_TSE, scan_options=("FS",))), T2, id="chinese-t2wi-fat-sat"),
    pytest.param(mr("T2 TSE AX", PHANTOM_T2), T2, id="phantom-t2"),
    pytest.param(mr("T2 TSE AX", dict(PHANTOM_T2, scan_options=(), repetition_time=6000.0, echo_time=90.0)), T2,
                 id="phantom-t2-no-scan-options"),  # fmt: skip
    pytest.param(mr(None, T2_TSE), T2, id="physics-only-t2"),
    pytest.param(mr(None, T2_TSE, protocol_name="t2_tse_tra"), T2, id="protocol-name-only-t2"),
    pytest.param(mr("Ax T2 FRFSE", T2_TSE, protocol_name="BRAIN PERFUSION W/WO CONTRAST"), T2,
                 id="ge-exam-protocol-name-ignored"),  # fmt: skip
    pytest.param(mr("AX T1 SE", T2_TSE), T2, id="misleading-t1-name-t2-physics"),
    pytest.param(mr("T2 TSE AX"), T2, id="name-only-t2"),
    pytest.param(mr("AX T2 +C", dict(T2_TSE, **GD)), T2, id="t2-after-contrast-is-t2"),
    # --- flair ------------------------------------------------------------------------------
    pytest.param(mr("t2_tirm_tra_dark-fluid", FLAIR_2D), FLAIR, id="siemens-tirm-dark-fluid"),
    pytest.param(mr("t2_space_dark-fluid_sag_p2_iso", FLAIR_3D), FLAIR, id="siemens-space-dark-fluid-3d"),
    pytest.param(mr("Ax T2 FLAIR", FLAIR_2D), FLAIR, id="ge-t2-flair"),
    pytest.param(mr("Sag CUBE FLAIR", CUBE_FLAIR), FLAIR, id="ge-cube-flair"),
    pytest.param(mr("3D_FLAIR_VISTA", VISTA_FLAIR), FLAIR, id="philips-vista-flair"),
    pytest.param(mr("BRAIN VIEW FLAIR", VISTA_FLAIR), FLAIR, id="philips-brainview-flair"),
    pytest.param(mr("T2W_FLAIR", FLAIR_2D), FLAIR, id="philips-t2w-flair"),
    pytest.param(mr("FLAIR_AX", FLAIR_2D), FLAIR, id="canon-flair"),
    pytest.param(mr("t2_flair_sag_3d", FLAIR_3D), FLAIR, id="uih-t2-flair-3d"),
    pytest.param(mr("T2-FLAIR", FLAIR_2D), FLAIR, id="chinese-site-t2-flair"),
    pytest.param(mr("T2水抑制", FLAIR_2D), FLAIR, id="chinese-water-suppressed"),
    pytest.param(mr("T2 FLAIR AX", dict(PHANTOM_FLAIR, mr_acquisition_type="2D")), FLAIR, id="phantom-flair-2d"),
    pytest.param(mr("T2 SPACE FLAIR SAG 3D", dict(PHANTOM_FLAIR, mr_acquisition_type="3D")), FLAIR,
                 id="phantom-flair-3d"),  # fmt: skip
    pytest.param(mr(None, FLAIR_2D), FLAIR, id="physics-only-flair"),
    pytest.param(mr(None, dict(FLAIR_2D, scanning_sequence=())), FLAIR, id="physics-only-flair-no-scanning-sequence"),
    pytest.param(mr("AX T2 TSE", FLAIR_2D), FLAIR, id="misleading-t2-name-flair-physics"),
    pytest.param(mr("AX T2", dict(FLAIR_2D, scanning_sequence=("SE",), inversion_time=2800.0, repetition_time=11000.0)),
                 FLAIR, id="flair-ti-without-ir-token"),  # fmt: skip
    pytest.param(mr("AX T2 FLAIR +C", dict(FLAIR_2D, **GD)), FLAIR, id="flair-after-contrast-is-flair"),
    pytest.param(mr("FLAIR"), FLAIR, id="name-only-flair"),
    # --- t1c --------------------------------------------------------------------------------
    pytest.param(mr("t1_mprage_sag_p2_iso", dict(MPRAGE, **GD)), T1C, id="siemens-mprage-agent"),
    pytest.param(mr("t1_mprage_sag_p2_iso_post", MPRAGE), T1C, id="siemens-mprage-post-name"),
    pytest.param(mr("t1_vibe_fs_tra_post", VIBE), T1C, id="siemens-vibe-post"),
    pytest.param(mr("t1_se_tra", dict(T1_SE, **GD)), T1C, id="siemens-t1-se-agent"),
    pytest.param(mr("t1_se_tra_KM", T1_SE), T1C, id="siemens-german-km"),
    pytest.param(mr("Sag 3D T1 BRAVO +C", BRAVO), T1C, id="ge-bravo-plus-c"),
    pytest.param(mr("Ax 3D FSPGR +C", FSPGR), T1C, id="ge-fspgr-plus-c"),
    pytest.param(mr("Ax T1 FLAIR +C", T1_FLAIR), T1C, id="ge-t1-flair-plus-c"),
    pytest.param(mr("T1W_3D_TFE +Gd", TFE), T1C, id="philips-tfe-gd"),
    pytest.param(mr("T1W_SE", dict(T1_SE, contrast_bolus_agent="DOTAREM")), T1C, id="philips-t1w-se-agent"),
    pytest.param(mr("MPRAGE+C", MPRAGE), T1C, id="canon-mprage-plus-c"),
    pytest.param(mr("t1_gre_fsp_3d_sag+C", VIBE), T1C, id="uih-gre-fsp-plus-c"),
    pytest.param(mr("T1WI+C", T1_SE), T1C, id="chinese-t1wi-plus-c"),
    pytest.param(mr("矢状位增强T1WI", MPRAGE), T1C, id="chinese-enhanced-t1wi"),
    pytest.param(mr("T1WI增强压脂", T1_SE), T1C, id="chinese-t1wi-enhanced-fat-sat"),
    pytest.param(mr("CE_MPRAGE", MPRAGE), T1C, id="ce-mprage"),
    pytest.param(mr("t1_mpr_sag_p2_iso", dict(MPRAGE, **GD)), T1C, id="siemens-old-t1-mpr-name-not-reformat"),
    pytest.param(mr("3D T1 MPR SAG +C", MPRAGE), T1C, id="t1-mpr-sag-name-not-reformat"),
    pytest.param(mr("T1 SE", dict(T1_SE, contrast_bolus_volume=15.0)), T1C, id="contrast-volume-only"),
    pytest.param(mr(None, dict(T1_SE, **GD)), T1C, id="physics-only-t1-se-agent"),
    pytest.param(mr("T1", contrast_bolus_agent="Gd"), T1C, id="name-t1-plus-agent-no-physics"),
    pytest.param(mr("T1C"), T1C, id="name-only-t1c-token"),
    pytest.param(mr("T2 AX", dict(MPRAGE, **GD)), T1C, id="misleading-t2-name-mprage-physics"),
    pytest.param(mr("T1 MPRAGE SAG +C", PHANTOM_T1C), T1C, id="phantom-t1c-mprage"),
    pytest.param(mr("T1 SE AX +C", dict(T1_SE, contrast_bolus_agent="Gadobutrol")), T1C, id="phantom-t1c-se"),
    # --- none: T1 without contrast, dark-fluid T1 ----------------------------------------------
    pytest.param(mr("t1_mprage_sag_p2_iso", MPRAGE), NONE, id="t1-mprage-no-contrast"),
    pytest.param(mr(None, MPRAGE), NONE, id="physics-only-t1-no-contrast"),
    pytest.param(mr("T1 pre", T1_SE), NONE, id="t1-pre"),
    pytest.param(mr("Ax T1 pre", dict(T1_SE, **GD)), NONE, id="t1-pre-stale-agent"),
    pytest.param(mr("T1 precontrast MPRAGE", MPRAGE), NONE, id="t1-precontrast"),
    pytest.param(mr("Sag 3D w/o contrast", MPRAGE), NONE, id="negated-contrast-word"),
    pytest.param(mr("T1WI平扫", dict(T1_SE, **GD)), NONE, id="chinese-t1wi-plain-stale-agent"),
    pytest.param(mr("T1 SE AX", dict(T1_SE, contrast_bolus_agent="NONE")), NONE, id="agent-none-string"),
    pytest.param(mr("T1 SE AX", dict(T1_SE, contrast_bolus_agent="Gd", contrast_administered=False)), NONE,
                 id="enhanced-administered-no"),  # fmt: skip
    pytest.param(mr("Ax T1 FLAIR", T1_FLAIR), NONE, id="dark-fluid-t1-flair-no-contrast"),
    pytest.param(mr("FLAIR", T1_FLAIR), NONE, id="flair-name-t1-flair-physics"),
    pytest.param(mr("t1_flair_tra", T1_FLAIR, manufacturer="UIH"), NONE, id="uih-t1-flair"),
    pytest.param(mr("SAG T1 POST FOSSA", T1_SE), NONE, id="t1-posterior-fossa-not-post-contrast"),
    pytest.param(mr("AX T1 POST OP", T1_SE), NONE, id="t1-post-op-not-post-contrast"),
    pytest.param(mr("SAG T1 C-SPINE", T1_SE), NONE, id="t1-cervical-spine-not-contrast"),
    # --- none: localizers and calibration ------------------------------------------------------
    pytest.param(mr("AAHead_Scout_32ch-head-coil", dict(LOCALIZER, **GD)), NONE, id="siemens-aahead-scout"),
    pytest.param(mr("localizer", LOCALIZER), NONE, id="siemens-localizer"),
    pytest.param(mr("3-Plane Loc", LOCALIZER, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), NONE,
                 id="ge-3-plane-loc"),  # fmt: skip
    pytest.param(mr("ASSET Calibration", LOCALIZER), NONE, id="ge-asset-calibration"),
    pytest.param(mr("SmartSurvey", LOCALIZER), NONE, id="philips-smartsurvey"),
    pytest.param(mr("SENSE RefScan", LOCALIZER), NONE, id="philips-refscan"),
    pytest.param(mr("Locator", LOCALIZER), NONE, id="canon-locator"),
    pytest.param(mr("定位像", LOCALIZER), NONE, id="chinese-localizer"),
    # --- none: diffusion ---------------------------------------------------------------------
    pytest.param(mr("ep2d_diff_mddw_20_p2", DWI), NONE, id="siemens-dwi"),
    pytest.param(mr("ep2d_diff_mddw_20_p2_ADC", DWI, image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC")), NONE,
                 id="siemens-adc"),  # fmt: skip
    pytest.param(mr("ep2d_diff_mddw_20_p2_TRACEW", DWI, image_type=("DERIVED", "PRIMARY", "DIFFUSION", "TRACEW")),
                 NONE, id="siemens-tracew"),  # fmt: skip
    pytest.param(mr("ep2d_diff_mddw_20_p2_FA", None, image_type=("DERIVED", "PRIMARY", "DIFFUSION", "FA")), NONE,
                 id="siemens-fa"),  # fmt: skip
    pytest.param(mr("Ax DTI", DWI), NONE, id="ge-dti"),
    pytest.param(mr("DWI", PHILIPS_DWI), NONE, id="philips-spin-echo-dwi"),
    pytest.param(mr(None, PHILIPS_DWI), NONE, id="physics-only-b-value"),
    pytest.param(mr("dADC", PHILIPS_DWI, diffusion_b_value=None), NONE, id="philips-dadc-name"),
    pytest.param(mr("DWI_b1000", dict(PHILIPS_DWI, diffusion_b_value=None)), NONE, id="canon-dwi-b1000"),
    pytest.param(mr("弥散加权", dict(PHILIPS_DWI, diffusion_b_value=None)), NONE, id="chinese-diffusion"),
    # --- none: perfusion and dynamic -----------------------------------------------------------
    pytest.param(mr("ep2d_perf", DSC), NONE, id="siemens-dsc"),
    pytest.param(mr("t1_twist_tra_dyn", dict(VIBE, **GD)), NONE, id="siemens-dce-twist"),
    pytest.param(mr(None, dict(DCE, **GD)), NONE, id="physics-only-dce-temporal-positions"),
    pytest.param(mr("Ax 3D ASL", PD), NONE, id="ge-asl"),
    pytest.param(mr("DISCO", dict(VIBE, **GD)), NONE, id="ge-disco"),
    pytest.param(mr("PWI", DSC), NONE, id="pwi"),
    pytest.param(mr("灌注成像", dict(VIBE, **GD)), NONE, id="chinese-perfusion"),
    # --- none: susceptibility ------------------------------------------------------------------
    pytest.param(mr("t2_swi_tra_p2_1.5mm", SWI), NONE, id="siemens-swi"),
    pytest.param(mr("mIP_Images(SW)", SWI, image_type=("DERIVED", "PRIMARY", "MNIP")), NONE, id="siemens-swi-mip"),
    pytest.param(mr("Pha_Images", SWI, image_type=("ORIGINAL", "PRIMARY", "P", "ND")), NONE, id="siemens-phase"),
    pytest.param(mr("Ax SWAN", dict(SWI, echo_time=25.0, repetition_time=40.0)), NONE, id="ge-swan"),
    pytest.param(mr("Ax T2* GRE", T2STAR), NONE, id="ge-t2-star-gre"),
    pytest.param(mr("T2_FFE", dict(T2STAR, echo_time=15.0)), NONE, id="philips-t2-ffe"),
    pytest.param(mr("SWIp", SWI), NONE, id="philips-swip"),
    pytest.param(mr("AX T2", T2STAR), NONE, id="misleading-t2-name-gre-physics"),
    pytest.param(mr("磁敏感加权成像", SWI), NONE, id="chinese-swi"),
    pytest.param(mr("Phase", T2STAR, complex_image_component="PHASE"), NONE, id="enhanced-phase-component"),
    # --- none: angiography and flow ------------------------------------------------------------
    pytest.param(mr("tof_fl3d_tra_p2", TOF), NONE, id="siemens-tof"),
    pytest.param(mr("3D TOF", TOF), NONE, id="ge-3d-tof"),
    pytest.param(mr(None, dict(TOF, **GD), angio=True), NONE, id="physics-only-angio-flag"),
    pytest.param(mr("TOF MIP", TOF, image_type=("DERIVED", "PRIMARY", "MIP")), NONE, id="tof-mip"),
    pytest.param(mr("MRV", TOF), NONE, id="mr-venography"),
    pytest.param(mr("CSF flow PC cine", T2STAR), NONE, id="csf-flow"),
    # --- none: derived, reformats, screen captures ---------------------------------------------
    pytest.param(mr("t1_mprage_sag_p2_iso_MPR_Tra", dict(MPRAGE, **GD), image_type=("DERIVED", "SECONDARY", "MPR")),
                 NONE, id="siemens-mpr-reformat"),  # fmt: skip
    pytest.param(mr("Reformatted", dict(MPRAGE, **GD), image_type=("DERIVED", "SECONDARY", "REFORMATTED")), NONE,
                 id="ge-reformatted"),  # fmt: skip
    pytest.param(mr("t2_tse_tra", T2_TSE, image_type=("DERIVED", "SECONDARY")), NONE, id="derived-secondary"),
    pytest.param(mr("t1_mprage_sag_p2_iso_MPR_Cor", dict(MPRAGE, **GD), image_type=()), NONE,
                 id="siemens-mpr-reformat-name-only"),  # fmt: skip
    pytest.param(mr("Screen Save", sop_class_uid=SecondaryCaptureImageStorage), NONE, id="ge-screen-save"),
    pytest.param(mr("T2 TSE AX", T2_TSE, sop_class_uid=SecondaryCaptureImageStorage), NONE,
                 id="secondary-capture-sop-class"),  # fmt: skip
    pytest.param(mr("t1_vibe_post_SUB", VIBE), NONE, id="subtraction"),
    pytest.param(mr("t1_vibe_dixon_tra_post_F", VIBE), NONE, id="dixon-fat-image"),
    pytest.param(mr("T2 MAP", T2_TSE), NONE, id="t2-map"),
    pytest.param(mr("MAGiC FLAIR", FLAIR_2D), NONE, id="ge-magic-synthetic"),
    # --- none: spectroscopy, functional, other contrasts ---------------------------------------
    pytest.param(mr("svs_se_135", sop_class_uid=MRSpectroscopyStorage), NONE, id="siemens-svs-sop-class"),
    pytest.param(mr("PROBE-P SV 35", dict(T2_TSE, echo_time=144.0)), NONE, id="ge-probe-spectroscopy"),
    pytest.param(mr("csi_se_30", T2_TSE), NONE, id="siemens-csi-name"),
    pytest.param(mr("波谱", T2_TSE), NONE, id="chinese-spectroscopy"),
    pytest.param(mr("ep2d_bold_resting", DSC), NONE, id="siemens-bold"),
    pytest.param(mr("t2_tirm_cor", STIR), NONE, id="siemens-tirm-stir"),
    pytest.param(mr(None, STIR), NONE, id="physics-only-stir"),
    pytest.param(mr("PD_TSE_AX", PD), NONE, id="proton-density"),
    pytest.param(mr(None, PD), NONE, id="physics-only-proton-density"),
    pytest.param(mr("FIESTA-C", BSSFP), NONE, id="ge-fiesta"),
    pytest.param(mr(None, BSSFP), NONE, id="physics-only-bssfp"),
    pytest.param(mr("t1_mp2rage_sag_INV2", MP2RAGE_INV2), NONE, id="mp2rage-inv2"),
    pytest.param(mr(None, MP2RAGE_INV2), NONE, id="physics-only-mp2rage-inv2"),
    # --- none: other modality, nothing to go on, conflicts -------------------------------------
    pytest.param(mr("T2 AX", T2_TSE, modality="CT"), NONE, id="not-mr"),
    pytest.param(mr(None), NONE, id="no-name-no-physics"),
    pytest.param(mr("AX T2 FLAIR", dict(FLAIR_2D, scanning_sequence=("SE",), inversion_time=None)), NONE,
                 id="flair-name-without-inversion-conflict"),  # fmt: skip
]


@pytest.mark.parametrize(("header", "expected"), CORPUS)
def test_corpus(header: SeriesHeader, expected: Label) -> None:
    """Each vendor-style header gets the label a reader of its physics and name would give."""
    result = classify(header, RULES)
    assert result.label is expected, result.reason
    assert result.series_instance_uid == header.series_instance_uid
    assert result.reason


def test_corpus_is_broad() -> None:
    """The corpus holds at least 60 cases and several of every label."""
    labels = [p.values[1] for p in CORPUS]
    assert len(labels) >= 60
    assert all(labels.count(label) >= 10 for label in Label)


def test_physics_wins_over_name_and_says_so() -> None:
    """A series named T2 with FLAIR inversion physics is FLAIR, and the reason says physics won."""
    result = classify(mr("AX T2 TSE", FLAIR_2D), RULES)
    assert result.label is Label.FLAIR
    assert "TI 2500 ms" in result.reason and "physics wins" in result.reason


def test_t1_without_contrast_reason() -> None:
    """A pre-contrast T1 is not routed and the reason says why."""
    result = classify(mr("t1_mprage_sag_p2_iso", MPRAGE), RULES)
    assert "pre-contrast T1 is not routed" in result.reason


def test_contrast_reason_names_the_agent() -> None:
    """A T1 routed as t1c names the contrast evidence it used."""
    result = classify(mr("t1_se_tra", dict(T1_SE, **GD)), RULES)
    assert "ContrastBolusAgent 'Gadovist'" in result.reason


def test_exclusion_reason_names_the_pattern() -> None:
    """A name exclusion quotes the attribute, its value and the pattern."""
    result = classify(mr("ep2d_diff_mddw", None), RULES)
    assert result.reason.startswith("excluded: SeriesDescription 'ep2d_diff_mddw': none pattern #")
    assert result.reason.endswith("matched 'diff'")


def test_conflict_reason() -> None:
    """A FLAIR name on a spin echo with no recorded inversion is refused as a conflict."""
    result = classify(mr("AX T2 FLAIR", dict(FLAIR_2D, scanning_sequence=("SE",), inversion_time=None)), RULES)
    assert result.reason.startswith("conflict:")


_physics_values = st.one_of(st.none(), st.floats(min_value=0, max_value=20000, allow_nan=False))


@settings(derandomize=True, max_examples=300, deadline=None)
@given(
    desc=st.one_of(st.none(), st.text(max_size=30)),
    ss=st.lists(st.sampled_from(["SE", "GR", "IR", "EP", "RM"]), max_size=3).map(tuple),
    tr=_physics_values,
    te=_physics_values,
    ti=_physics_values,
    flip=_physics_values,
    agent=st.one_of(st.none(), st.text(max_size=10)),
)
def test_classify_total(
    desc: str | None, ss: tuple[str, ...], tr: float | None, te: float | None, ti: float | None, flip: float | None,
    agent: str | None,
) -> None:  # fmt: skip
    """classify returns a label and a reason for any combination of physics and name."""
    header = mr(desc, scanning_sequence=ss, repetition_time=tr, echo_time=te, inversion_time=ti, flip_angle=flip,
                contrast_bolus_agent=agent)  # fmt: skip
    result = classify(header, RULES)
    assert isinstance(result.label, Label) and result.reason


# --- compile_rules --------------------------------------------------------------------------
def test_default_pattern_keys() -> None:
    """DEFAULT_PATTERNS has exactly the six documented keys, each non-empty."""
    assert set(DEFAULT_PATTERNS) == {"t1c", "t2", "flair", "none", "contrast", "t1"}
    assert all(DEFAULT_PATTERNS[key] for key in DEFAULT_PATTERNS)


def test_patterns_ignore_case_and_search_anywhere() -> None:
    """Patterns are compiled case-insensitive and found anywhere in the name (re.search)."""
    rules = compile_rules()
    assert all(p.flags & re.IGNORECASE for p in rules.flair)
    assert rules.search("flair", "sag 3d Flair iso") == "flair pattern #1 matched 'Flair'"


def test_unknown_key_is_rejected() -> None:
    """An unknown key raises ValueError naming the key."""
    with pytest.raises(ValueError, match="'t1ce'"):
        compile_rules({"t1ce": ["x"]})


def test_bad_regex_names_key_and_pattern() -> None:
    """A pattern that does not compile raises ValueError naming the key and the pattern."""
    with pytest.raises(ValueError, match=r"'\(unclosed'.*'flair'"):
        compile_rules({"flair": ["flair", "(unclosed"]})


def test_string_instead_of_list_is_rejected() -> None:
    """A bare string (which would iterate as characters) is rejected for a key."""
    with pytest.raises(ValueError, match="'t2' must be a list of strings"):
        compile_rules({"t2": "t2"})


def test_override_replaces_default_list() -> None:
    """A key in overrides replaces its default patterns; other keys keep theirs."""
    rules = compile_rules({"t2": [r"^site_t2$"]})
    assert classify(mr("site_t2"), rules).label is Label.T2
    assert classify(mr("T2 TSE AX"), rules).label is Label.NONE
    assert classify(mr("T2 FLAIR"), rules).label is Label.FLAIR


def test_empty_override_disables_key() -> None:
    """An empty list disables a key: with no none patterns a DWI name no longer excludes."""
    rules = compile_rules({"none": []})
    assert classify(mr("ep2d_diff T2", T2_TSE), rules).label is Label.T2
    assert classify(mr("ep2d_diff T2", T2_TSE), RULES).label is Label.NONE


# --- header_from_dataset --------------------------------------------------------------------
def _classic(**values: Any) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
    ds.SeriesInstanceUID = f"{UID_ROOT}.7"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_header_from_classic_dataset() -> None:
    """A classic MR Image header is read into typed fields and classifies from its physics."""
    ds = _classic(
        SeriesDescription="t2_tirm_tra_dark-fluid", ScanningSequence=["SE", "IR"], SequenceVariant="SK\\SP\\MP",
        ScanOptions="PFP", MRAcquisitionType="2D", RepetitionTime="9000", EchoTime=81.0, InversionTime="2500",
        FlipAngle=150, SeriesNumber=5, SeriesDate="20240131", SeriesTime="101500", Rows=256, Columns=232,
        PixelSpacing=[0.9, 0.9], SliceThickness="5", Manufacturer="SIEMENS",
    )  # fmt: skip
    header = header_from_dataset(ds, n_instances=24)
    assert header.scanning_sequence == ("SE", "IR")
    assert header.sequence_variant == ("SK", "SP", "MP")
    assert (header.repetition_time, header.echo_time, header.inversion_time) == (9000.0, 81.0, 2500.0)
    assert header.pixel_spacing == (0.9, 0.9) and header.n_slices == 24 and header.series_number == 5
    assert header.image_type == ORIGINAL and header.sop_class_uid == MRImageStorage
    assert classify(header, RULES).label is Label.FLAIR


def test_header_from_phantom_style_t1c() -> None:
    """The phantom generator's T1c header (MPRAGE + Gadobutrol) reads and classifies as t1c."""
    ds = _classic(
        SeriesDescription="T1 MPRAGE SAG +C", ScanningSequence=["GR", "IR"], SequenceVariant=["SK", "SP", "MP"],
        MRAcquisitionType="3D", RepetitionTime=2000, EchoTime=3, InversionTime=900, FlipAngle=9,
        ContrastBolusAgent="Gadobutrol",
    )  # fmt: skip
    header = header_from_dataset(ds)
    assert header.contrast_bolus_agent == "Gadobutrol"
    assert classify(header, RULES).label is Label.T1C


def test_header_from_real_toshiba_file() -> None:
    """pydicom's MR_small.dcm (a Toshiba 3D spin echo, DERIVED\\SECONDARY) is read and excluded as derived."""
    path = get_testdata_file("MR_small.dcm")
    assert isinstance(path, str)
    header = header_from_dataset(pydicom.dcmread(path, stop_before_pixels=True))
    assert header.manufacturer == "TOSHIBA_MEC" and header.sequence_variant == ("NONE",)
    assert (header.repetition_time, header.echo_time, header.mr_acquisition_type) == (4000.0, 240.0, "3D")
    assert classify(header, RULES).reason.startswith("excluded: ImageType DERIVED\\SECONDARY")
    as_original = dataclasses.replace(header, image_type=ORIGINAL)
    assert classify(as_original, RULES).label is Label.T2


def _raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, True, True)


def test_malformed_values_become_none() -> None:
    """Unparseable or wrong-length stored values are read as None instead of raising."""
    ds = _classic()
    _raw(ds, 0x00180080, "DS", b"abc ")  # RepetitionTime
    _raw(ds, 0x00180081, "DS", b"x\\y ")  # EchoTime
    _raw(ds, 0x00180082, "DS", b"-5")  # InversionTime: negative
    _raw(ds, 0x00180091, "IS", b"12")  # EchoTrainLength, not read: harmless
    _raw(ds, 0x00280010, "US", b"\x01\x02\x03")  # Rows: wrong length
    _raw(ds, 0x00280030, "DS", b"0.5 ")  # PixelSpacing: one value
    _raw(ds, 0x00200011, "IS", b"1.5 ")  # SeriesNumber: not an integer
    _raw(ds, 0x00180020, "CS", b"SE IR ")  # ScanningSequence: space instead of backslash
    _raw(ds, 0x00181314, "DS", b"nan ")  # FlipAngle
    header = header_from_dataset(ds)
    assert header.repetition_time is None and header.echo_time is None and header.inversion_time is None
    assert header.rows is None and header.pixel_spacing is None and header.series_number is None
    assert header.flip_angle is None
    assert header.scanning_sequence == ("SE", "IR")
    assert classify(header, RULES).label is Label.NONE


_FUZZED_TAGS = [
    (0x00080008, "CS"), (0x00080060, "CS"), (0x0008103E, "LO"), (0x00180020, "CS"), (0x00180021, "CS"),
    (0x00180080, "DS"), (0x00180081, "DS"), (0x00180082, "DS"), (0x00181314, "DS"), (0x00180010, "LO"),
    (0x00181041, "DS"), (0x00189087, "FD"), (0x00200011, "IS"), (0x00200105, "IS"), (0x00280030, "DS"),
    (0x00280010, "US"), (0x00280008, "IS"), (0x00189008, "CS"), (0x00180025, "CS"),
]  # fmt: skip


@settings(derandomize=True, max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_FUZZED_TAGS), st.binary(max_size=24)), max_size=12))
def test_header_from_dataset_never_raises(elements: list[tuple[tuple[int, str], bytes]]) -> None:
    """Arbitrary stored bytes in the attributes read give a header and a classification, never an exception."""
    ds = _classic()
    for (tag, vr), value in elements:
        _raw(ds, tag, vr, value)
    result = classify(header_from_dataset(ds), RULES)
    assert isinstance(result.label, Label)


def test_angio_flag_y_excludes() -> None:
    """A classic AngioFlag of Y marks the series as angiography and excludes it."""
    ds = _classic(AngioFlag="Y", ScanningSequence="GR", RepetitionTime=22, EchoTime=3.5, FlipAngle=18,
                  ContrastBolusAgent="Gadovist")  # fmt: skip
    header = header_from_dataset(ds)
    assert header.angio is True
    assert classify(header, RULES).reason == "excluded: angiography / phase-contrast / ASL flag set"
    assert header_from_dataset(_classic(AngioFlag="N")).angio is None


def test_empty_dataset() -> None:
    """An empty dataset gives an all-None header that classifies as none without raising."""
    header = header_from_dataset(Dataset())
    assert header.series_instance_uid == "" and header.modality is None and header.image_type == ()
    assert classify(header, RULES).label is Label.NONE


def test_chinese_description_round_trip() -> None:
    """A UTF-8 Chinese SeriesDescription survives a file round trip and classifies."""
    ds = _classic(SpecificCharacterSet="ISO_IR 192", SeriesDescription="矢状位增强T1WI", ScanningSequence="SE",
                  RepetitionTime=500, EchoTime=10, SOPInstanceUID=f"{UID_ROOT}.8")  # fmt: skip
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    header = header_from_dataset(pydicom.dcmread(buffer))
    assert header.series_description == "矢状位增强T1WI"
    assert classify(header, RULES).label is Label.T1C


def _item(**values: Any) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _enhanced(shared: dict[str, Dataset], frames: list[dict[str, Dataset]], **top: Any) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.Modality = "MR"
    ds.SeriesInstanceUID = f"{UID_ROOT}.9"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.NumberOfFrames = len(frames)
    group = Dataset()
    for keyword, item in shared.items():
        setattr(group, keyword, DicomSequence([item]))
    ds.SharedFunctionalGroupsSequence = DicomSequence([group])
    per_frame = []
    for frame in frames:
        fg = Dataset()
        for keyword, item in frame.items():
            setattr(fg, keyword, DicomSequence([item]))
        per_frame.append(fg)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    for keyword, value in top.items():
        setattr(ds, keyword, value)
    return ds


def test_enhanced_mr_flair_from_functional_groups() -> None:
    """Enhanced MR physics in the shared functional groups is read and classifies a 3D FLAIR."""
    ds = _enhanced(
        shared={
            "MRTimingAndRelatedParametersSequence": _item(RepetitionTime=5000.0, FlipAngle=120.0),
            "MREchoSequence": _item(EffectiveEchoTime=387.0),
            "MRModifierSequence": _item(InversionRecovery="YES", InversionTimes=[1800.0]),
            "PixelMeasuresSequence": _item(PixelSpacing=[1.0, 1.0], SliceThickness=1.0),
            "MRImageFrameTypeSequence": _item(FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
                                              AcquisitionContrast="FLUID_ATTENUATED"),  # fmt: skip
        },
        frames=[{}] * 3,
        EchoPulseSequence="SPIN", MRAcquisitionType="3D", SeriesDescription="3D FLAIR",
    )  # fmt: skip
    header = header_from_dataset(ds)
    assert (header.repetition_time, header.echo_time, header.inversion_time) == (5000.0, 387.0, 1800.0)
    assert header.inversion_recovery is True and header.echo_pulse_sequence == "SPIN"
    assert header.pixel_spacing == (1.0, 1.0) and header.n_slices == 3
    assert header.acquisition_contrast == "FLUID_ATTENUATED"
    result = classify(header, RULES)
    assert result.label is Label.FLAIR and "TI 1800 ms" in result.reason


def test_enhanced_mr_diffusion_in_per_frame_groups() -> None:
    """A b-value on any frame (after a b=0 frame) marks an Enhanced MR series as diffusion."""
    ds = _enhanced(
        shared={"MRTimingAndRelatedParametersSequence": _item(RepetitionTime=4000.0)},
        frames=[
            {"MRDiffusionSequence": _item(DiffusionBValue=0.0), "MREchoSequence": _item(EffectiveEchoTime=90.0)},
            {"MRDiffusionSequence": _item(DiffusionBValue=1000.0), "MREchoSequence": _item(EffectiveEchoTime=90.0)},
        ],
        EchoPulseSequence="SPIN", SeriesDescription="AX T2",
    )  # fmt: skip
    header = header_from_dataset(ds)
    assert header.diffusion_b_value == 1000.0 and header.echo_time == 90.0
    assert classify(header, RULES).label is Label.NONE


def test_enhanced_mr_contrast_usage() -> None:
    """Enhanced MR contrast usage and agent code sequence count as contrast evidence for a T1."""
    agent = _item(CodeValue="C-B0322", CodingSchemeDesignator="SRT", CodeMeaning="Gadobutrol")
    ds = _enhanced(
        shared={
            "MRTimingAndRelatedParametersSequence": _item(RepetitionTime=2300.0, FlipAngle=8.0),
            "MREchoSequence": _item(EffectiveEchoTime=2.3),
            "MRModifierSequence": _item(InversionRecovery="YES", InversionTimes=[900.0]),
        },
        frames=[{"ContrastBolusUsageSequence": _item(ContrastBolusAgentNumber=1, ContrastBolusAgentAdministered="YES")}],
        EchoPulseSequence="GRADIENT", ContrastBolusAgentSequence=DicomSequence([agent]),
    )  # fmt: skip
    header = header_from_dataset(ds)
    assert header.contrast_bolus_agent == "Gadobutrol" and header.contrast_administered is True
    assert classify(header, RULES).label is Label.T1C


def test_enhanced_mr_flags() -> None:
    """Enhanced MR time-of-flight, echo-planar and steady-state flags are read and exclude the series."""
    base = dict(SeriesDescription="T1 +C", EchoPulseSequence="GRADIENT")
    for flag, value in (("TimeOfFlightContrast", "YES"), ("EchoPlanarPulseSequence", "YES"),
                        ("SteadyStatePulseSequence", "FREE_PRECESSION")):  # fmt: skip
        header = header_from_dataset(_enhanced(shared={}, frames=[{}], **base, **{flag: value}))
        result = classify(header, RULES)
        assert result.label is Label.NONE and result.reason.startswith("excluded:"), flag


# --- choose ---------------------------------------------------------------------------------
def _candidate(uid: str, label: Label = Label.T1C, **values: Any) -> tuple[SeriesHeader, Classification]:
    fields: dict[str, Any] = dict(series_instance_uid=uid, image_type=ORIGINAL, pixel_spacing=(1.0, 1.0),
                                  n_instances=100, series_date="20240101", series_time="100000", series_number=5)  # fmt: skip
    fields.update(values)
    return SeriesHeader(**fields), Classification(uid, label, "test")


def test_choose_prefers_original() -> None:
    """An ORIGINAL series beats a DERIVED one even when the derived one is finer."""
    picked = choose([_candidate("a", image_type=("DERIVED", "PRIMARY")), _candidate("b", pixel_spacing=(2.0, 2.0))])
    assert picked[Label.T1C].series_instance_uid == "b"
    assert "by ORIGINAL image" in picked[Label.T1C].reason and "rejected a" in picked[Label.T1C].reason


def test_choose_finest_resolution() -> None:
    """Among ORIGINAL series the smallest pixel area wins."""
    picked = choose([_candidate("a", pixel_spacing=(0.9, 0.9)), _candidate("b", pixel_spacing=(0.5, 0.5))])
    assert picked[Label.T1C].series_instance_uid == "b"
    assert "finest in-plane resolution (0.25 mm2 pixel vs 0.81 mm2 pixel)" in picked[Label.T1C].reason


def test_choose_most_slices() -> None:
    """With equal resolution the series with more slices (instances x frames) wins."""
    picked = choose([_candidate("a", n_instances=176), _candidate("b", n_instances=1, number_of_frames=192)])
    assert picked[Label.T1C].series_instance_uid == "b"
    assert "most slices" in picked[Label.T1C].reason


def test_choose_latest_then_series_number() -> None:
    """Then the latest date/time wins, then the highest series number."""
    later = choose([_candidate("a", series_time="101500"), _candidate("b", series_time="09:30:00")])
    assert later[Label.T1C].series_instance_uid == "a" and "latest series date/time" in later[Label.T1C].reason
    by_number = choose([_candidate("a", series_number=12), _candidate("b", series_number=7)])
    assert by_number[Label.T1C].series_instance_uid == "a"
    assert "highest series number" in by_number[Label.T1C].reason


def test_choose_one_per_label_never_none() -> None:
    """choose returns one Choice per routed label and never one for none."""
    picked = choose([
        _candidate("t2-a", Label.T2), _candidate("none-a", Label.NONE), _candidate("fl-a", Label.FLAIR),
        _candidate("none-b", Label.NONE, pixel_spacing=(0.1, 0.1)),
    ])  # fmt: skip
    assert set(picked) == {Label.T2, Label.FLAIR}
    assert picked[Label.T2] == Choice(Label.T2, "t2-a", "only t2 series")
    assert choose([]) == {}


def test_choose_missing_values_lose() -> None:
    """A series with no PixelSpacing or date loses to one that has them, and the order is stable."""
    picked = choose([_candidate("a", pixel_spacing=None), _candidate("b")])
    assert picked[Label.T1C].series_instance_uid == "b"
    assert "no PixelSpacing" in picked[Label.T1C].reason
    assert choose([_candidate("b"), _candidate("a")]) == choose([_candidate("a"), _candidate("b")])


def test_series_header_is_frozen() -> None:
    """SeriesHeader is immutable."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        mr("x").echo_time = 1.0  # type: ignore[misc]


# --- description-free series, every vendor style (issue 19 item 9-11: physics alone) ---------
# Private b-value homes: (group, creator, element offset, VR).
_PRIVATE_B = {
    "siemens": (0x0019, "SIEMENS MR HEADER", 0x0C, "IS"),
    "ge": (0x0043, "GEMS_PARM_01", 0x39, "IS"),
    "philips": (0x2001, "Philips Imaging DD 001", 0x03, "FL"),
}
_VENDOR = {"siemens": "SIEMENS", "ge": "GE MEDICAL SYSTEMS", "philips": "Philips Medical Systems",
           "canon": "CANON_MEC"}  # fmt: skip


def _deidentified_series(vendor: str, physics: dict[str, Any], n_positions: int = 4,
                         b_values: tuple[float, ...] = (), private_b: bool = False) -> list[Dataset]:
    """A classic MR series with SeriesDescription and ProtocolName removed (PS3.15 E.1).

    With *b_values*, each slice position holds one image per b-value (b = 0 first), the
    b-value in DiffusionBValue or, with *private_b*, only in the vendor's private tag.
    """
    out = []
    for z in range(n_positions):
        for b in b_values or (None,):
            ds = _classic(Manufacturer=_VENDOR[vendor], ImagePositionPatient=[-120.0, -130.5, -40.0 + 5 * z],
                          ImageOrientationPatient=[1, 0, 0, 0, 1, 0], **physics)  # fmt: skip
            if b is not None and private_b:
                group, creator, offset, vr = _PRIVATE_B[vendor]
                value: Any = b + 1e9 if vendor == "ge" else b
                ds.private_block(group, creator, create=True).add_new(
                    offset, vr, [str(int(value)), "8", "0", "0"] if vendor == "ge" else
                    (str(int(value)) if vr == "IS" else float(value)))  # fmt: skip
            elif b is not None:
                ds.DiffusionBValue = b
            out.append(ds)
    return out


_SE_DWI = dict(ScanningSequence="SE", SequenceVariant="SK", MRAcquisitionType="2D", RepetitionTime=3000.0,
               EchoTime=80.0)  # fmt: skip
_EP_DWI = dict(_SE_DWI, ScanningSequence="EP")
_T2 = dict(ScanningSequence="SE", SequenceVariant=["SK", "SP"], MRAcquisitionType="2D", RepetitionTime=5000.0,
           EchoTime=100.0)  # fmt: skip
_FLAIR = dict(_T2, ScanningSequence=["SE", "IR"], RepetitionTime=9000.0, EchoTime=120.0, InversionTime=2500.0)
_T1C = dict(ScanningSequence=["GR", "IR"], SequenceVariant=["SK", "SP", "MP"], MRAcquisitionType="3D",
            RepetitionTime=2000.0, EchoTime=3.0, InversionTime=900.0, FlipAngle=9.0, ContrastBolusAgent="Gadobutrol")


@pytest.mark.parametrize(("vendor", "private_b"), [*((v, False) for v in _VENDOR), *((v, True) for v in _PRIVATE_B)])
def test_deidentified_spin_echo_dwi_is_none(vendor: str, private_b: bool) -> None:
    """A spin-echo DWI (b 0 and 1000 at each position) with its descriptions removed is never a T2."""
    series = _deidentified_series(vendor, _SE_DWI, b_values=(0.0, 1000.0), private_b=private_b)
    header = header_from_series(series)
    assert header.series_description is None and header.protocol_name is None
    assert header.diffusion_b_value == 1000.0 and header.images_per_position == 2.0
    result = classify(header, RULES)
    assert result.label is Label.NONE and result.reason.startswith("excluded: b-value 1000"), result.reason
    # the first image alone (b = 0) carries nothing diffusion-like but the repeated positions do
    first = classify(header_from_dataset(series[0]), RULES)
    assert first.label is Label.T2  # why the series-level header is needed


def test_issue_19_philips_dwi_b0_first_private_only() -> None:
    """Issue 19 item 11: Philips SE DWI, b 0 and 1000 per position, only in (2001,1003), no names: none."""
    series = _deidentified_series("philips", _SE_DWI, n_positions=20, b_values=(0.0, 1000.0), private_b=True)
    series[0].ImageType = ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"]
    assert classify(header_from_series(series), RULES).label is Label.NONE


def test_repeated_positions_alone_exclude() -> None:
    """Two images per slice position with no b-value anywhere (e.g. a stripped DWI) is excluded."""
    series = _deidentified_series("canon", _SE_DWI, b_values=(0.0, 0.0))
    for ds in series:
        del ds.DiffusionBValue
    result = classify(header_from_series(series), RULES)
    assert result.label is Label.NONE and "2 images per slice position" in result.reason


@pytest.mark.parametrize("vendor", ["siemens", "ge", "philips", "canon"])
def test_deidentified_echo_planar_dwi_is_none(vendor: str) -> None:
    """An EPI DWI whose trace image type was rewritten to M\\ND and descriptions removed is none."""
    series = _deidentified_series(vendor, _EP_DWI, b_values=(0.0, 1000.0))
    assert classify(header_from_series(series), RULES).label is Label.NONE


@pytest.mark.parametrize("vendor", ["siemens", "ge", "philips", "canon"])
@pytest.mark.parametrize(("physics", "expected"), [(_T2, Label.T2), (_FLAIR, Label.FLAIR), (_T1C, Label.T1C)],
                         ids=["t2", "flair", "t1c"])  # fmt: skip
def test_deidentified_plain_series_keep_their_label(vendor: str, physics: dict[str, Any], expected: Label) -> None:
    """T2, FLAIR and T1c series with descriptions removed are still labelled from physics alone."""
    header = header_from_series(_deidentified_series(vendor, physics, n_positions=6))
    assert header.images_per_position == 1.0 and header.diffusion_b_value is None
    assert classify(header, RULES).label is expected


def test_deidentified_enhanced_mr_diffusion_directionality() -> None:
    """Enhanced MR: a DiffusionDirectionality / MR Diffusion Sequence marks diffusion even at b = 0."""
    ds = _enhanced(
        shared={"MRTimingAndRelatedParametersSequence": _item(RepetitionTime=4000.0),
                "MREchoSequence": _item(EffectiveEchoTime=90.0)},
        frames=[{"MRDiffusionSequence": _item(DiffusionBValue=0.0, DiffusionDirectionality="ISOTROPIC")}],
        EchoPulseSequence="SPIN", MRAcquisitionType="2D",
    )  # fmt: skip
    result = classify(header_from_series([ds]), RULES)
    assert result.label is Label.NONE and "DiffusionDirectionality ISOTROPIC" in result.reason
    plain = _enhanced(
        shared={"MRTimingAndRelatedParametersSequence": _item(RepetitionTime=5000.0),
                "MREchoSequence": _item(EffectiveEchoTime=100.0)},
        frames=[{"PlanePositionSequence": _item(ImagePositionPatient=[0.0, 0.0, float(z)])} for z in range(3)],
        EchoPulseSequence="SPIN", MRAcquisitionType="2D",
    )  # fmt: skip
    header = header_from_series([plain])
    assert header.images_per_position == 1.0 and classify(header, RULES).label is Label.T2
