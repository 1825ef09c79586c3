"""Built-in series-name patterns of :mod:`dmg_node.classify` (``DEFAULT_PATTERNS``).

One tuple of regular expressions per key: ``t1c``, ``t2``, ``flair`` and ``none`` label a series
by its name, ``contrast`` is contrast evidence for a T1 and ``t1`` marks a T1-weighted name. A
``[classify]`` key in node.toml replaces that key's tuple (:func:`dmg_node.classify.compile_rules`).

Patterns are matched with :meth:`re.Pattern.search` (anywhere in the name) and
``re.IGNORECASE``. They guard word edges with ``(?<![a-z0-9])`` / ``(?![a-z0-9])`` rather than
``\\b``, because ``\\b`` treats ``_`` as a letter and vendors use ``_`` as a separator
("t2_tse_tra").
"""

from __future__ import annotations

from collections.abc import Mapping

_B = r"(?<![a-z0-9])"  # left word edge; "_" and "-" count as separators
_E = r"(?![a-z0-9])"  # right word edge
# A contrast word preceded by one of these is a *negated* contrast word ("pre-contrast",
# "non Gd", "w/o contrast", 非增强) and is no contrast evidence.
_NOT = (
    r"(?<!pre)(?<!pre[ _-])(?<!non)(?<!non[ _-])(?<!w/o)(?<!w/o )(?<!without )"
    r"(?<!no )(?<!no[_-])(?<!非)(?<!未)(?<!无)"
)
_T1_WORD = _B + r"(t1|mp[ _-]?rage|bravo|f?spgr|tfe|vibe|flash)"
_PRE_WORD = (
    _B + r"(pre|pre[ _-]?(contrast|gd|gad|c)|non[ _-]?(contrast|enh\w*|gd)|w/?o[ _-]?(contrast|gd|c)"
    r"|without[ _-]contrast|nativ|native|plain)" + _E + r"|平扫|非增强|未增强"
)

DEFAULT_PATTERNS: Mapping[str, tuple[str, ...]] = {
    # t1c: names that by themselves say "T1 after contrast": T1C, T1CE, T1Gd, T1+C, T1WI+C,
    # T1 C+, T1-enh, T1WI增强 / 增强T1 (增强 = enhanced).
    "t1c": (
        _B + r"t1(w|wi)?(c|ce)" + _E,
        _B + r"t1(w|wi)?[ _-]?(ce|gd|enh)" + _E,
        _B + r"t1(w|wi)?[ _-]?(\+[ _-]?(c|gd)|c[ _-]?\+)" + _E,
        r"t1(w|wi)?[ _-]?(?<!非)(?<!未)增强|(?<!非)(?<!未)增强[ _-]?t1",
    ),
    # t2: T2-weighted names: T2, T2W, T2WI, t2_tse, T2 加权, and single-shot/radial T2
    # sequences often named without "T2" (HASTE, SSFSE, FRFSE, PROPELLER, BLADE, MultiVane).
    "t2": (
        _B + r"t2(?![0-9*])",
        _B + r"(haste|ssfse|frfse|propeller|blade|multivane)" + _E,
    ),
    # flair: fluid-attenuated names: FLAIR (Siemens, GE CUBE FLAIR, Philips VISTA/BrainView
    # FLAIR, Canon, United Imaging t2_flair), Siemens dark-fluid / "*spcir" sequence name,
    # Chinese 液体衰减 (fluid attenuated) and 水抑制 (water suppressed).
    "flair": (
        r"flair",
        r"dark[ _-]?fluid",
        r"fluid[ _-]?att",
        _B + r"spcir",
        r"液体衰减|水抑制",
    ),
    # none: series that are never routed, whatever their physics looks like.
    "none": (
        # localizers, calibration and reference scans (Siemens AAHead_Scout, GE 3-Plane Loc /
        # ASSET calibration, Philips SmartSurvey / SENSE RefScan, Canon locator, 定位 = localizer)
        _B + r"(loc|localizer|localiser|locator|scout|aahead\w*|survey|smartsurvey|pilot|tripilot"
        r"|calibration|cal|refscan|ref[ _-]?scan|ref[ _-]?head|3[ _-]?pl(ane)?[ _-]?loc)" + _E,
        _B + r"(asset|pure|sense|coil)[ _-]?(cal|ref|survey)",
        r"定位",
        # diffusion (ep2d_diff, DWI, DTI, ADC, TRACEW, FA, b1000, RESOLVE; 弥散 / 扩散 = diffusion)
        _B + r"(dwi|dti|diff|diffusion|adc|eadc|dadc|trace|tracew|fa|colfa|dki|ivim|tensor|resolve"
        r"|b[ _-]?(0|[1-9][0-9]{2,3}))" + _E,
        _B + r"ep_b[0-9]",
        r"弥散|扩散",
        # perfusion and dynamic series (DSC, DCE, ASL, PWI, maps, TWIST, DISCO; 灌注 / 动态)
        _B + r"(perf|perfusion|dsc|dce|asl|pasl|casl|pcasl|pwi|rcbv|rcbf|cbf|cbv|mtt|ttp|tmax|ktrans"
        r"|dyn|dynamic|twist|disco|4d|bolus|multi[ _-]?phase)" + _E,
        r"灌注|动态",
        # susceptibility (SWI, SWAN, SWIp, T2*, GRE-T2*, minimum/maximum projections; 磁敏感)
        _B + r"(swi|swip|swan|esswan|qsm|hemo|mip|minip|min[ _-]ip|mnip|pha|phase)" + _E,
        r"t2[ _-]?\*|" + _B + r"t2[ _-]?star",
        _B + r"((gre|fgre|ffe|fe|mpgr)[ _-]?t2|t2[ _-]?(gre|ffe|fe|mpgr))" + _E,
        r"磁敏感|相位",
        # angiography, venography and flow (TOF, MRA, MRV, PC, inhance, cine, Q-flow; 血管)
        _B + r"(tof|mra|mrv|angio\w*|venogra\w*|pc[ _-]?(mra|a|2d|3d)|inhance|flow|cine|velocity)" + _E,
        r"血管",
        # spectroscopy (SVS, CSI, PRESS, STEAM, GE PROBE; 波谱)
        _B + r"(mrs|svs|csi|spectro\w*|press|steam|probe)" + _E,
        r"波谱",
        # functional MRI
        _B + r"(bold|fmri|rs[ _-]?fmri|resting[ _-]?state|moco)" + _E,
        # derived images: reformats, projections, subtractions, maps, synthetic MR, screen
        # captures (重建 = reconstruction, 减影 = subtraction, 截图 / 截屏 = screenshot, 融合 = fusion)
        r"(?<!t1)_mpr_(cor|tra|sag)" + _E,
        _B + r"mpr[ _-]?(range|thick)",
        _B + r"(reformat\w*|sub|subtract\w*|screen\w*|secondary|mosaic|report|fused|fusion"
        r"|colou?r[ _-]?map|mapping|relax\w*|magic|synthetic|syn[ _-]?mr)" + _E,
        _B + r"(t1|t2|t2s|r1|r2|r2s|pd)[ _-]?map",
        _B + r"(mp2rage|inv1|inv2|uni|uni[ _-]?den)" + _E,
        r"重建|减影|截图|截屏|融合",
        # other contrasts no model takes: STIR / TIRM without dark-fluid, proton density,
        # balanced SSFP (FIESTA, CISS, TrueFISP, bFFE), Dixon fat / in / opposed phase
        _B + r"(stir|pd|pdw|pdwi|proton[ _-]?dens\w*|fiesta(-c)?|ciss|trufi|true[ _-]?fisp"
        r"|true[ _-]?ssfp|bssfp|b[ _-]?ffe|balanced|tfi)" + _E,
        _B + r"tirm(?!.*dark)",
        r"dixon.*" + _B + r"(opp|in|f|fat|ip|op)" + _E,
        # T1 explicitly before contrast (even if a stale ContrastBolusAgent is recorded):
        # "T1 pre", "pre-Gd MPRAGE", "T1 nativ", T1WI 平扫 (平扫 = plain scan, non-contrast)
        _T1_WORD + r".*(" + _PRE_WORD + r")",
        r"(" + _PRE_WORD + r").*" + _T1_WORD,
    ),
    # contrast: contrast-enhanced words, each ignored when negated (pre-/non-/w/o/without/
    # 非/未): +C, C+, post (not "post fossa" / "post-op"), Gd, gadolinium and agent names,
    # contrast, CE, enh(anced), German KM, 增强 (enhanced), 钆 (gadolinium), 对比剂 (contrast agent).
    "contrast": (
        _NOT + r"\+ ?(c|gd|gad)" + _E,
        _NOT + _B + r"c ?\+",
        _NOT + _B + r"post([ _-]?(contrast|gd|gad|c))?" + _E + r"(?![ _-]*(fossa|op)" + _E + ")",
        _NOT + _B + r"(gd|gad|gado\w*|gadolinium|dotarem|gadovist|gadavist|magnevist|multihance"
        r"|prohance|omniscan|clariscan|elucirem|vueway|eovist|primovist)" + _E,
        _NOT + _B + r"(contrast|kontrast|km|ce|enh|enhanced|enhancement)" + _E,
        _NOT + r"(增强|钆|对比剂)",
    ),
    # t1: T1-weighted names: T1, T1W, T1WI, t1_mprage, T1 FLAIR, and 3D T1 sequences named
    # without "T1" (MPRAGE, BRAVO, (F)SPGR, Philips TFE, VIBE, FLASH, LAVA, Siemens "*tfl3d").
    "t1": (
        _B + r"t1(?![0-9])",
        _B + r"(mp[ _-]?rage|bravo|f?spgr|tfe|vibe|flash|lava)" + _E,
        _B + r"tfl3d",
    ),
}
