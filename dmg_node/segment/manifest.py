"""A model folder: ``manifest.json`` plus weights files whose SHA-256 the manifest records.

Layout of ``models/<name>/``::

    manifest.json      this module's Manifest, as JSON
    generator.pt       generator state_dict (torch; used on GPU)
    generator.onnx     the same generator exported to ONNX (used on CPU)

Loading verifies each listed file's SHA-256 and the expected sequence before any weights are
deserialised, so a truncated copy or a model filed under the wrong sequence is refused with a
:class:`~dmg_node.errors.ModelError` that says which rule failed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dmg_node.errors import ModelError
from dmg_node.fsutil import atomic_write
from dmg_node.segment.network import GeneratorConfig
from dmg_node.segment.preprocess import PreprocessConfig
from dmg_node.segment.refine import GrowConfig

MANIFEST_NAME = "manifest.json"
TORCH_WEIGHTS = "generator.pt"
ONNX_WEIGHTS = "generator.onnx"
SEQUENCES = ("t1c", "t2", "flair")
DEMO_USE = "phantom-trained demo, not for clinical use"
RESEARCH_USE = "research use only, not for clinical use"
FORMAT = 1


@dataclass(frozen=True)
class Manifest:
    """What a model is, how its input is prepared, and how it was trained.

    Attributes
    ----------
    name
        Model name (the folder name by default).
    sequence
        MR sequence the model segments: ``t1c``, ``t2`` or ``flair``.
    version
        Model version string.
    created
        ISO 8601 UTC time of creation.
    generator
        Network hyper-parameters.
    preprocess
        Resampling and normalisation parameters shared with training.
    patch_size
        Training patch and sliding-window size on the model grid, (S, P, L) voxels.
    sha256
        Weights file name (relative to the folder) -> hex SHA-256.
    threshold
        Probability above which a voxel is tumour (calibrated on the validation cases).
    training
        Description of the training data and run (data source, phantom seeds, epochs, losses).
    metrics
        Validation/test figures (for example ``val_dice``).
    intended_use
        States that the model is not for clinical use (:data:`DEMO_USE` for the phantom-trained
        demo models, :data:`RESEARCH_USE` otherwise).
    max_spacing_mm
        The coarsest series this model is meant for: a series whose largest voxel spacing (the
        slice spacing of a 2D series) exceeds this many mm goes to the next model configured for
        the sequence (:mod:`dmg_node.segment.routing`). ``None`` (the default): any series.
    grow
        Optional intensity-guided growth of the post-processed mask
        (:mod:`dmg_node.segment.refine`), chosen on the validation cases of this model.
        ``None`` (the default): the mask is used as it is.
    """

    name: str
    sequence: str
    version: str
    generator: GeneratorConfig
    preprocess: PreprocessConfig
    patch_size: tuple[int, int, int]
    sha256: dict[str, str]
    threshold: float = 0.5
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    intended_use: str = RESEARCH_USE
    max_spacing_mm: float | None = None
    grow: GrowConfig | None = None

    def __post_init__(self) -> None:
        if self.max_spacing_mm is not None and not self.max_spacing_mm > 0:
            raise ModelError(f"manifest max_spacing_mm must be a positive number of mm; found {self.max_spacing_mm!r}")

    def to_json(self) -> str:
        """The manifest as indented JSON text."""
        data = {
            "format": FORMAT,
            "name": self.name,
            "sequence": self.sequence,
            "version": self.version,
            "created": self.created,
            "intended_use": self.intended_use,
            **({} if self.max_spacing_mm is None else {"max_spacing_mm": self.max_spacing_mm}),
            "generator": self.generator.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "patch_size": list(self.patch_size),
            "sha256": self.sha256,
            "threshold": self.threshold,
            **({} if self.grow is None else {"grow": self.grow.to_dict()}),
            "training": self.training,
            "metrics": self.metrics,
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse :meth:`to_json` output.

        Raises
        ------
        ModelError
            If the text is not JSON or lacks a required key.
        """
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ModelError(f"manifest format must be {FORMAT}; found {data.get('format')!r}")
            patch = tuple(int(p) for p in data["patch_size"])
            if len(patch) != 3:
                raise ModelError(f"manifest patch_size must have 3 values; found {len(patch)}")
            return cls(
                name=str(data["name"]),
                sequence=str(data["sequence"]),
                version=str(data["version"]),
                created=str(data["created"]),
                intended_use=str(data["intended_use"]),
                generator=GeneratorConfig.from_dict(data["generator"]),
                preprocess=PreprocessConfig.from_dict(data["preprocess"]),
                patch_size=(patch[0], patch[1], patch[2]),
                sha256={str(k): str(v) for k, v in data["sha256"].items()},
                threshold=float(data["threshold"]),
                training=dict(data.get("training", {})),
                metrics={str(k): float(v) for k, v in data.get("metrics", {}).items()},
                max_spacing_mm=None if data.get("max_spacing_mm") is None else float(data["max_spacing_mm"]),
                grow=None if data.get("grow") is None else GrowConfig.from_dict(dict(data["grow"])),
            )
        except json.JSONDecodeError as exc:
            raise ModelError(f"manifest must be JSON; parsing failed: {exc}") from exc
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"manifest is missing or has an invalid field: {exc!r}") from exc


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` into ``model_dir`` atomically; return its path."""
    path = model_dir / MANIFEST_NAME
    atomic_write(path, manifest.to_json().encode())
    return path


def load_manifest(model_dir: Path, sequence: str | None = None) -> Manifest:
    """Read and verify ``model_dir/manifest.json``.

    Parameters
    ----------
    model_dir
        The model folder.
    sequence
        When given, the manifest's sequence must equal it.

    Returns
    -------
    Manifest
        The parsed manifest, after every listed weights file matched its SHA-256.

    Raises
    ------
    ModelError
        If the manifest is missing or invalid, the sequence differs, no weights are listed, or
        a weights file is missing or altered.
    """
    path = model_dir / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelError(f"model folder must contain {MANIFEST_NAME}; cannot read {path}: {exc}") from exc
    manifest = Manifest.from_json(text)
    if manifest.sequence not in SEQUENCES:
        raise ModelError(f"manifest sequence must be one of {SEQUENCES}; found {manifest.sequence!r} in {path}")
    if sequence is not None and manifest.sequence != sequence:
        raise ModelError(f"model in {model_dir} must be for sequence {sequence!r}; its manifest says {manifest.sequence!r}")
    if not manifest.sha256:
        raise ModelError(f"manifest must list at least one weights file with its sha256; {path} lists none")
    for name, expected in manifest.sha256.items():
        weights = model_dir / name
        if not weights.is_file():
            raise ModelError(f"weights file {name} listed in {path} is missing")
        actual = sha256_file(weights)
        if actual != expected:
            raise ModelError(
                f"weights file {weights} must have sha256 {expected} (manifest); found {actual}: corrupt or replaced"
            )
    return manifest
