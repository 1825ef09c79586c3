"""``dmg-node inference-serve``: deploy the Serve application on a Ray cluster and keep it current.

Connects to the cluster (``--address`` or ``inference.address``), starts Serve's HTTP proxy on the
given host and port, deploys one deployment per model folder that verifies (manifest and SHA-256
of the weights), then watches the folders: a folder whose files changed and then stayed still for
:data:`~dmg_node.segment.registry.SETTLE_SECONDS` is verified again and, when it verifies, its
deployment is given a new version. Serve then starts replicas of the new version and moves
requests to them only once their constructor has loaded the model; the old replicas serve until
then. A folder that does not verify keeps its running version (logged). On stop the application
is deleted (the cluster keeps running).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import structlog

from dmg_node.config import Settings
from dmg_node.errors import ModelError
from dmg_node.segment.manifest import load_manifest
from dmg_node.segment.registry import SETTLE_SECONDS, Signature, folder_signature
from dmg_node.serving.app import (
    build_model_app,
    build_router_app,
    configured_folders,
    model_app,
    revision,
)

log = structlog.get_logger(__name__)

WATCH_SECONDS = 2.0


def verified(folder: Path) -> bool:
    """True when the folder's manifest and weights verify (logged when they do not)."""
    try:
        load_manifest(folder)
    except ModelError as exc:
        log.error("model_unavailable", model_dir=str(folder), error=str(exc))
        return False
    return True


class ServeApp:
    """The deployed applications and the folder signatures each model was deployed with."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.inference.application
        self.signatures: dict[Path, Signature] = {}
        self.rejected: dict[Path, Signature] = {}  # folders that did not verify, as they were then

    def deploy_model(self, folder: Path, sig: Signature) -> None:
        """(Re)deploy one folder's application; returns once its replicas have loaded the model."""
        from ray import serve

        rev = revision(sig)
        serve.run(build_model_app(self.settings, folder, rev), name=model_app(self.name, folder.name),
                  route_prefix=None, blocking=False)
        self.signatures[folder] = sig
        log.info("model_deployed", model_dir=str(folder), revision=rev)

    def deploy_router(self) -> None:
        from ray import serve

        folders = [f.name for f in self.signatures]
        serve.run(build_router_app(self.settings, folders), name=self.name, route_prefix=f"/{self.name}",
                  blocking=False)
        log.info("inference_app_deployed", application=self.name, models=folders)

    def start(self) -> None:
        """Deploy the folders that verify now, then the ingress.

        Raises
        ------
        ModelError
            If no configured folder verifies.
        """
        for folder in configured_folders(self.settings):
            if verified(folder):
                self.deploy_model(folder, folder_signature(folder))
        if not self.signatures:
            raise ModelError(f"no model folder under {self.settings.models.dir} verifies; nothing to serve")
        self.deploy_router()

    def reload(self, now: float) -> bool:
        """Roll each folder that changed, stayed still and verifies; True when one did."""
        changed = False
        for folder in configured_folders(self.settings):
            sig = folder_signature(folder)
            if not sig or sig in (self.signatures.get(folder), self.rejected.get(folder)):
                continue
            if now - max(mtime for _n, _s, mtime in sig) / 1e9 < SETTLE_SECONDS:
                continue  # still being copied
            if not verified(folder):
                log.warning("model_reload_failed", model_dir=str(folder), kept=folder in self.signatures)
                self.rejected[folder] = sig
                continue
            new = folder not in self.signatures
            self.deploy_model(folder, sig)
            log.info("model_reloaded", model_dir=str(folder), revision=revision(sig))
            if new:
                self.deploy_router()
            changed = True
        return changed

    def delete(self) -> None:
        from ray import serve

        for name in [self.name, *(model_app(self.name, f.name) for f in self.signatures)]:
            serve.delete(name)
        log.info("inference_app_deleted", application=self.name)


def serve_until(settings: Settings, address: str, http_host: str, http_port: int, stop: threading.Event) -> None:
    """Connect to the Ray cluster, deploy, watch the model folders until ``stop`` is set, delete.

    Raises
    ------
    ModelError
        If no configured model folder verifies.
    """
    import ray
    from ray import serve

    ray.init(address=address, namespace="dmg-node", log_to_driver=False, logging_level="warning")
    try:
        # Serve outlives its applications: where it already runs on the cluster, its proxy keeps
        # the host and port it started with (Serve logs so); only a fresh Serve takes these
        serve.start(http_options={"host": http_host, "port": http_port})
        app = ServeApp(settings)
        app.start()
        log.info("inference_serving", address=address, url=f"http://{http_host}:{http_port}/{app.name}")
        while not stop.wait(WATCH_SECONDS):
            app.reload(time.time())
        app.delete()
    finally:
        ray.shutdown()
