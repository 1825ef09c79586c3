"""The Ray Serve side: one deployment per model folder behind one ingress application.

Each model folder is its own small Serve application (one deployment), so a reloaded folder
rolls its own replicas and no other; the ingress application ``<application>`` routes to them.

Each model deployment loads its folder with the same manifest-verified :meth:`Segmenter.load` and
runs the same :meth:`Segmenter.predict` as a node's local backend (ONNX Runtime on CPU, torch on
CUDA when the replica has a GPU), so a mask served here equals the local one. The ingress
(:class:`Router`) takes ``POST /<application>/predict?sequence=t2&models=a,b`` with the volume
(:func:`dmg_node.segment.remote.encode_volume`), sends it to the first listed folder whose
manifest admits its voxel spacing (:func:`dmg_node.segment.routing.admits`, as a node's ModelSet
does) and answers the mask; ``GET /<application>/models`` lists what is deployed.

Answers: 200 mask; 422 this series cannot be segmented (the node rejects it, no retry); 503 none
of the listed folders is deployed (yet): the node retries later.

No batching across requests: one request is one whole volume whose sliding window already runs
window after window on the replica, and volumes differ in shape; concurrency comes from replicas
(``inference.num_replicas`` / ``max_replicas``) and ``max_ongoing_requests``.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from ray import serve

from dmg_node.config import Settings
from dmg_node.errors import SeriesError
from dmg_node.segment.remote import (
    CONTENT_TYPE,
    MODEL_HEADER,
    SECONDS_HEADER,
    VERSION_HEADER,
    decode_volume,
    encode_mask,
)
from dmg_node.segment.routing import admits

HTTP_NOT_FOUND = 404
HTTP_UNPROCESSABLE = 422
HTTP_UNAVAILABLE = 503
MODEL_DEPLOYMENT = "model"


class ModelReplica:
    """One model folder, loaded and verified once per replica (constructor = readiness)."""

    def __init__(self, folder: str, device: str, min_volume_mm3: float, revision: str) -> None:
        from dmg_node.segment.infer import PostprocessConfig, Segmenter

        self.segmenter = Segmenter.load(Path(folder), device=device,
                                        postprocess=PostprocessConfig(min_volume_mm3=min_volume_mm3))
        self.revision = revision

    def info(self) -> dict[str, Any]:
        """Name, version, sequence and ``max_spacing_mm`` from the manifest."""
        s = self.segmenter
        return {"name": s.name, "version": s.version, "sequence": s.sequence, "max_spacing_mm": s.max_spacing_mm,
                "device": s.device, "revision": self.revision}

    def predict(self, payload: bytes) -> dict[str, Any]:
        """Segment one encoded volume: ``{"mask", "name", "version", "seconds"}`` or ``{"rejected": reason}``."""
        start = time.perf_counter()
        try:
            mask = self.segmenter.predict(decode_volume(payload))
        except SeriesError as exc:
            return {"rejected": str(exc)}
        return {"mask": encode_mask(mask), "name": self.segmenter.name, "version": self.segmenter.version,
                "seconds": time.perf_counter() - start}


class Router:
    """The application's HTTP ingress: routes a volume to the first admitting model folder."""

    def __init__(self, application: str, folders: list[str]) -> None:
        # folder name -> handle of that folder's model application
        self.models = {f: serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=model_app(application, f))
                       for f in folders}

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, PlainTextResponse, Response

        path = request.url.path.rstrip("/")
        if request.method == "GET" and path.endswith("/models"):
            return JSONResponse({folder: await h.info.remote() for folder, h in self.models.items()})
        if request.method != "POST" or not path.endswith("/predict"):
            return PlainTextResponse("POST .../predict or GET .../models", status_code=HTTP_NOT_FOUND)
        sequence = request.query_params.get("sequence", "")
        listed = [f for f in request.query_params.get("models", "").split(",") if f]
        body: bytes = await request.body()
        try:
            spacing = decode_volume(body).spacing
        except (SeriesError, ValueError) as exc:
            return PlainTextResponse(str(exc), status_code=HTTP_UNPROCESSABLE)
        # as a node's ModelSet holds only the folders that loaded, a folder not deployed is passed over
        deployed = [f for f in listed if f in self.models]
        if not deployed:
            return PlainTextResponse(f"none of the model folders {listed} is deployed here "
                                     f"(deployed: {sorted(self.models)})", status_code=HTTP_UNAVAILABLE)
        for folder in deployed:
            info = await self.models[folder].info.remote()
            if info["sequence"] != sequence:
                return PlainTextResponse(f"model folder {folder} segments {info['sequence']}, not {sequence}",
                                         status_code=HTTP_UNPROCESSABLE)
            if admits(info["max_spacing_mm"], spacing):
                result = await self.models[folder].predict.remote(body)
                if "rejected" in result:
                    return PlainTextResponse(result["rejected"], status_code=HTTP_UNPROCESSABLE)
                return Response(result["mask"], media_type=CONTENT_TYPE,
                                headers={MODEL_HEADER: result["name"], VERSION_HEADER: result["version"],
                                         SECONDS_HEADER: f"{result['seconds']:.4f}"})
        return PlainTextResponse(f"no {sequence} model among {deployed} is meant for a series of "
                                 f"{max(spacing):.2f} mm voxel spacing", status_code=HTTP_UNPROCESSABLE)


def model_app(application: str, folder: str) -> str:
    """The Serve application of one model folder (``dmg-inference--demo-t2``): it rolls on its own."""
    return f"{application}--{folder}"


def configured_folders(settings: Settings) -> list[Path]:
    """Every model folder named in ``[models]`` (each once, in order), as absolute paths."""
    names = dict.fromkeys([*settings.models.t1c, *settings.models.t2, *settings.models.flair])
    return [(settings.models.dir / name).resolve() for name in names]


def revision(signature: object) -> str:
    """A deployment version from a folder's signature: a changed folder rolls its replicas."""
    return hashlib.sha256(repr(signature).encode()).hexdigest()[:12]


def build_model_app(settings: Settings, folder: Path, rev: str) -> Any:
    """One model folder's application (one deployment, no HTTP route of its own).

    Replica sizing comes from ``[inference]``: ``num_replicas`` (autoscaling up to
    ``max_replicas`` when that is larger), ``num_cpus`` and ``num_gpus`` (fractions allowed; a
    replica with a GPU runs torch on CUDA, one without runs ONNX Runtime on its CPUs).
    """
    inf = settings.inference
    scale: dict[str, Any] = (
        {"autoscaling_config": {"min_replicas": inf.num_replicas, "max_replicas": inf.max_replicas,
                                "target_ongoing_requests": 1}}
        if inf.max_replicas > inf.num_replicas else {"num_replicas": inf.num_replicas})
    # max_surge_percent=100: a new version's replicas start (load, verify) before the old ones stop
    return serve.deployment(ModelReplica).options(
        name=MODEL_DEPLOYMENT, max_surge_percent=100, max_ongoing_requests=inf.max_ongoing_requests,
        ray_actor_options={"num_cpus": inf.num_cpus, "num_gpus": inf.num_gpus}, **scale,
    ).bind(str(folder), "cuda" if inf.num_gpus > 0 else "cpu", settings.rtstruct.min_volume_mm3, rev)


def build_router_app(settings: Settings, folders: list[str]) -> Any:
    """The ingress application (route ``/<application>``) over the deployed model folders."""
    return serve.deployment(Router).options(
        name="router", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
    ).bind(settings.inference.application, folders)
