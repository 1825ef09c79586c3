"""Segmentation on a Ray Serve application (``[inference] backend = "ray"``), over HTTP.

:class:`RayModel` stands in for one sequence's models: it sends the series' voxels and geometry
to the Serve application started by ``dmg-node inference-serve`` (:mod:`dmg_node.serving.app`),
which picks the first of the sequence's model folders whose manifest admits the voxel spacing
(the same rule as :mod:`dmg_node.segment.routing`), runs the same ``Segmenter.predict`` the local
backend runs, and returns the mask. So the mask is the one local inference gives.

Why HTTP to Serve's proxy and not a Ray deployment handle in the node: a handle makes the node a
Ray driver, which must run the cluster's exact Ray and Python versions and is ended by Ray when
the cluster's GCS stays away; the node must outlive the cluster (the SCP keeps receiving). Over
HTTP the node needs no Ray at all, every failure is a timeout or a status code, and the hop can be
TLS through the ingress of a remote site (docs/scaling.md).

Only pixels and the affine cross the network: no UIDs, no patient attributes.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from dmg_node.config import InferenceSettings
from dmg_node.errors import InferenceUnavailable, SeriesError
from dmg_node.volume import Volume

log = structlog.get_logger(__name__)

CONTENT_TYPE = "application/x-npz"
HTTP_OK = 200
HTTP_UNPROCESSABLE = 422  # the series cannot be segmented (no model admits it, constant image): not retried
MODEL_HEADER = "x-dmg-model"
VERSION_HEADER = "x-dmg-model-version"
SECONDS_HEADER = "x-dmg-predict-seconds"  # the replica's own time for the volume (the rest is the hop)


def encode_volume(volume: Volume) -> bytes:
    """The voxels (float32) and the 4x4 affine of ``volume`` as an uncompressed ``.npz``."""
    buf = io.BytesIO()
    np.savez(buf, array=np.ascontiguousarray(volume.array, dtype=np.float32),
             affine=np.asarray(volume.affine, dtype=np.float64))
    return buf.getvalue()


def decode_volume(data: bytes) -> Volume:
    """A :class:`Volume` from :func:`encode_volume`'s bytes (placeholder UIDs: none are sent).

    Raises
    ------
    SeriesError
        The bytes are not such an ``.npz`` (pickles are refused).
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            array, affine = npz["array"].astype(np.float32, copy=False), npz["affine"].astype(np.float64)
        return Volume(array=array, affine=affine, series_instance_uid="", frame_of_reference_uid="",
                      sop_instance_uids=tuple(str(i) for i in range(array.shape[0])) if array.ndim == 3 else (),
                      sop_class_uid="")
    except (OSError, KeyError, ValueError) as exc:
        raise SeriesError(f"inference request is not a volume (.npz with array and affine): {exc}") from exc


def encode_mask(mask: npt.NDArray[np.bool_]) -> bytes:
    """A boolean mask as bits plus its shape (``.npz``): 1/8 of a byte per voxel."""
    buf = io.BytesIO()
    np.savez_compressed(buf, bits=np.packbits(mask.astype(bool).ravel()), shape=np.asarray(mask.shape, dtype=np.int64))
    return buf.getvalue()


def decode_mask(data: bytes) -> npt.NDArray[np.bool_]:
    """The mask :func:`encode_mask` encoded."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        shape = tuple(int(n) for n in npz["shape"])
        bits = npz["bits"]
    flat: npt.NDArray[np.bool_] = np.unpackbits(bits, count=int(np.prod(shape))).astype(bool)
    return flat.reshape(shape)


class RayModel:
    """One sequence's model folders, served by a Ray Serve application (a :class:`Routable`).

    It admits any voxel spacing (``max_spacing_mm`` None): the application routes among the
    folders. ``name`` and ``version`` are those of the model that served the last volume (the
    configured folder names and ``remote`` before the first).
    """

    def __init__(self, settings: InferenceSettings, sequence: str, folders: tuple[str, ...]) -> None:
        self.settings = settings
        self._sequence = sequence
        self.folders = folders
        self._served: tuple[str, str] = ("+".join(folders), "remote")

    @property
    def name(self) -> str:
        return self._served[0]

    @property
    def version(self) -> str:
        return self._served[1]

    @property
    def sequence(self) -> str:
        return self._sequence

    @property
    def device(self) -> str:
        return f"ray-serve {self.endpoint}"

    @property
    def max_spacing_mm(self) -> float | None:
        return None

    @property
    def endpoint(self) -> str:
        """The application's predict URL (the application name is its route prefix)."""
        return f"{self.settings.url.rstrip('/')}/{self.settings.application}/predict"

    def predict(self, volume: Volume) -> npt.NDArray[np.bool_]:
        """Segment ``volume`` remotely; the mask lies on ``volume``'s grid.

        Raises
        ------
        InferenceUnavailable
            The application did not answer within ``inference.timeout_seconds``, is not deployed,
            or answered with a server error (the job is retried later).
        SeriesError
            The application answered that this series cannot be segmented (not retried).
        """
        query = urllib.parse.urlencode({"sequence": self._sequence, "models": ",".join(self.folders)})
        request = urllib.request.Request(f"{self.endpoint}?{query}", data=encode_volume(volume), method="POST",
                                         headers={"Content-Type": CONTENT_TYPE})
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_seconds) as rsp:  # noqa: S310 - configured URL
                body: bytes = rsp.read()
                headers: Any = rsp.headers
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            if exc.code == HTTP_UNPROCESSABLE:
                raise SeriesError(detail) from exc
            raise InferenceUnavailable(f"{self.endpoint} answered HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, ConnectionError, OSError) as exc:
            raise InferenceUnavailable(f"{self.endpoint}: {getattr(exc, 'reason', exc)}") from exc
        try:
            mask = decode_mask(body)
        except (OSError, KeyError, ValueError) as exc:
            raise InferenceUnavailable(f"{self.endpoint} answered with no mask: {exc}") from exc
        if mask.shape != volume.array.shape:
            raise InferenceUnavailable(f"{self.endpoint} answered a {mask.shape} mask for a {volume.array.shape} volume")
        self._served = (str(headers.get(MODEL_HEADER, self._served[0])), str(headers.get(VERSION_HEADER, "remote")))
        return mask


def models_info(settings: InferenceSettings, timeout: float = 10.0) -> dict[str, Any]:
    """The application's deployed model folders (name, version, sequence, max_spacing_mm), for checks.

    Raises
    ------
    InferenceUnavailable
        The application does not answer.
    """
    url = f"{settings.url.rstrip('/')}/{settings.application}/models"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as rsp:  # noqa: S310 - configured URL
            info: dict[str, Any] = json.loads(rsp.read())
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise InferenceUnavailable(f"{url}: {getattr(exc, 'reason', exc)}") from exc
    return info
