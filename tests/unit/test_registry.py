"""Several models per sequence in node.toml: loading, routing by voxel spacing, live replacement."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from dmg_node import config
from dmg_node.classify import Label
from dmg_node.segment.registry import ModelRegistry, load_model
from dmg_node.training.export import save_model
from dmg_node.segment.manifest import DEMO_USE, TORCH_WEIGHTS
from dmg_node.segment.network import Generator
from dmg_node.segment.preprocess import PreprocessConfig
from tests.support import LOCALHOST, free_port
from tests.unit.test_infer import TINY
from tests.unit.test_preprocess import oblique_head


def _model(folder: Path, *, sequence: str = "t2", version: str = "1.0.0", max_spacing_mm: float | None = None) -> Path:
    torch.manual_seed(0)
    save_model(folder, Generator(TINY).eval(), sequence=sequence, preprocess=PreprocessConfig(),
               patch_size=(32, 32, 32), version=version, intended_use=DEMO_USE, max_spacing_mm=max_spacing_mm)
    old = time.time() - 60  # as if copied a minute ago: settled
    for p in folder.iterdir():
        os.utime(p, (old, old))
    return folder


def _settings(tmp_path: Path, t2: list[str]) -> config.Settings:
    return config.from_dict({
        "node": {"host": LOCALHOST, "port": free_port()},
        "storage": {"root": str(tmp_path / "spool"), "min_free_mb": 0},
        "models": {"dir": str(tmp_path / "models"), "device": "cpu", "t2": t2},
    })


@pytest.mark.slow
def test_the_configured_models_that_load_form_the_set_in_order(tmp_path: Path) -> None:
    """A missing folder or a model of another sequence is logged and left out; the rest keep their order."""
    models = tmp_path / "models"
    _model(models / "fine", max_spacing_mm=2.0)
    _model(models / "flair-model", sequence="flair")
    _model(models / "any")
    with capture_logs() as logs:
        loaded = load_model(_settings(tmp_path, ["fine", "missing", "flair-model", "any"]), Label.T2)
    assert loaded is not None and loaded.name == "fine+any"
    refused = {Path(e["model_dir"]).name: e["error"] for e in logs if e["event"] == "model_unavailable"}
    assert set(refused) == {"missing", "flair-model"}
    assert "must be for sequence 't2'" in refused["flair-model"]
    thin, _ = oblique_head(spacing=(1.0, 1.0, 1.0))
    thick, _ = oblique_head(spacing=(0.9, 0.9, 5.0))
    assert loaded.for_volume(thin).name == "fine"
    assert loaded.for_volume(thick).name == "any"
    assert load_model(_settings(tmp_path, ["missing"]), Label.T2) is None


def test_a_model_added_or_replaced_later_joins_the_set_without_a_restart(tmp_path: Path) -> None:
    """The node starts with the one folder present; the other appears later and takes its place in
    the configured order; a broken copy of it is refused and the loaded one keeps serving."""
    models = tmp_path / "models"
    _model(models / "any")
    registry = ModelRegistry(_settings(tmp_path, ["fine", "any"]))
    registry.reload()  # what start() and the maintenance thread do
    assert registry.models[Label.T2].name == "any"

    _model(models / "fine", max_spacing_mm=2.0)
    with capture_logs() as logs:
        registry.reload()
    assert registry.models[Label.T2].name == "fine+any"
    assert [e["model"] for e in logs if e["event"] == "model_reloaded"] == ["fine"]

    weights = models / "fine" / TORCH_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    old = time.time() - 60
    os.utime(weights, (old, old))
    with capture_logs() as logs:
        registry.reload()
    failed = [e for e in logs if e["event"] == "model_reload_failed"]
    assert failed and failed[0]["kept"] == "1.0.0"
    assert registry.models[Label.T2].name == "fine+any"


def test_a_folder_listed_for_two_sequences_serves_only_the_one_its_manifest_names(tmp_path: Path) -> None:
    """A T2 model also listed under flair is refused there, at start and on reload: FLAIR series
    must never reach a T2 model because the folder was loaded once for T2."""
    models = tmp_path / "models"
    _model(models / "t2-model")
    settings = config.from_dict({
        "node": {"host": LOCALHOST, "port": free_port()},
        "storage": {"root": str(tmp_path / "spool"), "min_free_mb": 0},
        "models": {"dir": str(models), "device": "cpu", "t2": "t2-model", "flair": "t2-model"},
    })
    registry = ModelRegistry(settings)
    with capture_logs() as logs:
        registry.reload()
    assert registry.models[Label.T2].name == "t2-model"
    assert Label.FLAIR not in registry.models
    assert [e["sequence"] for e in logs if e["event"] == "model_unavailable"] == ["flair"]
