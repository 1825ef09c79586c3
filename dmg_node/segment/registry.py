"""The models the node serves, one :class:`ModelSet` per sequence, and their hot reload.

A model folder that changes (a new version copied in) is loaded once its files have been still for
:data:`SETTLE_SECONDS`; the old model serves until the new one has loaded and verified, and a
folder that fails to load keeps the old one (logged).
"""

from __future__ import annotations

import time
from pathlib import Path

import structlog

from dmg_node.classify import Label
from dmg_node.config import InferenceBackend, Settings
from dmg_node.errors import ModelError
from dmg_node.segment.routing import ModelSet, Routable

log = structlog.get_logger(__name__)

ROUTED = (Label.T1C, Label.T2, Label.FLAIR)
SETTLE_SECONDS = 2.0

Signature = tuple[tuple[str, int, int], ...]


def model_dirs(settings: Settings, label: Label) -> list[Path]:
    """The model folders configured for one sequence, in order of preference."""
    return [settings.models.dir / name for name in getattr(settings.models, label.value)]


def sequences_without_model_files(settings: Settings) -> list[str]:
    """Sequences none of whose configured folders holds a ``manifest.json`` (checked without loading).

    ``dmg-node status`` uses this when the node is not running (a running node reports the
    models it actually loaded).
    """
    return [label.value for label in ROUTED
            if not any((folder / "manifest.json").is_file() for folder in model_dirs(settings, label))]


def folder_signature(folder: Path) -> Signature:
    """Names, sizes and mtimes of a folder's files: changes whenever a model is being replaced."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))
    except OSError:
        return ()


def load_segmenter(settings: Settings, label: Label, folder: Path) -> Routable | None:
    """Load the model in one folder; a missing or invalid one is logged and None returned."""
    from dmg_node.segment.infer import (  # torch import is slow: only when serving
        PostprocessConfig,
        Segmenter,
    )

    try:
        model: Routable = Segmenter.load(
            folder, device=str(settings.models.device), sequence=label.value,
            postprocess=PostprocessConfig(min_volume_mm3=settings.rtstruct.min_volume_mm3))
    except ModelError as exc:
        log.error("model_unavailable", sequence=label.value, model_dir=str(folder), error=str(exc))
        return None
    return model  # Segmenter.load logs model_loaded (with backend and threads)


def remote_models(settings: Settings) -> dict[Label, ModelSet]:
    """``[inference] backend = "ray"``: each sequence's folders, served by the Ray Serve application."""
    from dmg_node.segment.remote import RayModel

    return {label: ModelSet([RayModel(settings.inference, label.value, getattr(settings.models, label.value))])
            for label in ROUTED}


def load_model(settings: Settings, label: Label) -> ModelSet | None:
    """The models configured for one sequence that load; None (logged) when none does."""
    members = [m for folder in model_dirs(settings, label) if (m := load_segmenter(settings, label, folder)) is not None]
    return ModelSet(members) if members else None


class ModelRegistry:
    """Each sequence's :class:`ModelSet`, loaded from the configured folders and kept current.

    ``models`` is one dict, updated in place, so a pipeline holding it sees each reload. With
    *fixed* models (tests, the offline CLI) nothing is loaded from disk and :meth:`reload` does nothing.
    """

    def __init__(self, settings: Settings, *, fixed: dict[Label, ModelSet] | None = None) -> None:
        self.settings = settings
        self.fixed = fixed is not None
        self.models: dict[Label, ModelSet] = dict(fixed or {})
        # (sequence, model folder) -> the model last loaded from it for that sequence, and the
        # folder's signature then: a folder listed under two sequences is loaded (and checked) for each
        self._loaded: dict[tuple[Label, Path], Routable] = {}
        self._sigs: dict[tuple[Label, Path], Signature] = {}
        self._stale = False

    def load_all(self) -> None:
        """Load every configured folder now (start-up)."""
        if self.fixed:
            return
        if self.remote:
            self.models.update(remote_models(self.settings))
            return
        for label, folder in self._configured_folders():
            self._load_folder(label, folder, folder_signature(folder))
        self._rebuild_sets()

    def reload(self, now: float | None = None) -> bool:
        """Load a new or replaced model once its folder is stable; the old one serves until then.

        Returns True when the served models changed.
        """
        if self.fixed:
            return False
        if self.remote:  # the Serve application reloads its own folders (dmg_node.serving)
            if self._stale:
                self._stale = False
                self.models.clear()
                self.models.update(remote_models(self.settings))
            return False
        now = time.time() if now is None else now
        changed = False
        for label, folder in self._configured_folders():
            sig = folder_signature(folder)
            if sig == self._sigs.get((label, folder)) or not sig:
                continue
            newest = max(mtime for _name, _size, mtime in sig) / 1e9
            if now - newest < SETTLE_SECONDS:
                continue  # still being copied: the next wake-up (or the fallback poll) looks again
            old = self._loaded.get((label, folder))
            model = self._load_folder(label, folder, sig)
            if model is None:
                log.warning("model_reload_failed", sequence=label.value, model_dir=str(folder),
                            kept=getattr(old, "version", None))
                continue
            changed = True
            log.info("model_reloaded", sequence=label.value, model=model.name, version=model.version)
        if changed or self._stale:
            self._rebuild_sets()
            return True
        return False

    def configure(self, settings: Settings) -> None:
        """New settings: when ``[models]`` changed, reload every folder at the next :meth:`reload`."""
        old, self.settings = self.settings, settings
        if (old.models != settings.models or old.inference != settings.inference) and not self.fixed:
            self._sigs.clear()  # the folders or the device may differ
            self._stale = True  # and regroup them as configured now

    @property
    def remote(self) -> bool:
        """True when segmentation runs on the Ray Serve application (``inference.backend``)."""
        return self.settings.inference.backend is InferenceBackend.RAY

    def _configured_folders(self) -> list[tuple[Label, Path]]:
        return [(label, folder) for label in ROUTED for folder in model_dirs(self.settings, label)]

    def _load_folder(self, label: Label, folder: Path, sig: Signature) -> Routable | None:
        """Load one configured folder for one sequence (recording the signature it had); None if it fails."""
        self._sigs[(label, folder)] = sig
        model = load_segmenter(self.settings, label, folder)
        if model is not None:
            self._loaded[(label, folder)] = model
        return model

    def _rebuild_sets(self) -> None:
        """Each sequence's models, in the configured order, from the folders that loaded."""
        self._stale = False
        for label in ROUTED:
            members = [self._loaded[(label, f)] for f in model_dirs(self.settings, label) if (label, f) in self._loaded]
            if members:
                self.models[label] = ModelSet(members)
            else:
                self.models.pop(label, None)
