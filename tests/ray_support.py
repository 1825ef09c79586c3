"""Ray helpers for tests and benchmarks: a local Ray head in its own process group, and
``dmg-node inference-serve`` on it. Every process started here is bounded in time and stopped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmg_node.config import InferenceSettings
from tests.support import LOCALHOST, free_port, node_config, stop_process, wait_port

APP = "dmg-inference"


@dataclass
class RayCluster:
    """A local Ray head in its own session: every process it starts shares one process group."""

    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / f"head-{self.port}.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address", LOCALHOST,
             "--port", str(self.port), "--dashboard-host", LOCALHOST, "--include-dashboard=false",
             "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port()),
             "--num-cpus", "2", "--disable-usage-stats", "--temp-dir", str(self.workdir / "t")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_port(self.port, 120, self.proc)

    def kill(self) -> None:
        """SIGKILL the whole group (the cluster vanishes, as when its machine goes away)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            self.proc = None


@dataclass
class ServeApp:
    """``dmg-node inference-serve`` on the cluster, its models folder and its Serve HTTP port."""

    workdir: Path
    models_dir: Path
    http_port: int
    folders: dict[str, str]  # [models] t1c, t2, flair of the Serve side
    inference: dict[str, Any] = field(default_factory=dict)  # [inference] sizing: num_replicas, num_cpus...
    cfg: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cfg = node_config(self.workdir, free_port(), models={"dir": str(self.models_dir), **self.folders},
                               inference=self.inference)

    @property
    def settings(self) -> InferenceSettings:
        return InferenceSettings(url=f"http://{LOCALHOST}:{self.http_port}", application=APP, timeout_seconds=120)

    def start(self, address: str) -> None:
        self.log_path = self.workdir / f"serve-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dmg_node.cli", "inference-serve", "--config", str(self.cfg),
                 "--address", address, "--http-host", LOCALHOST, "--http-port", str(self.http_port)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        self.wait_event("inference_serving", timeout=300)

    def events(self) -> list[dict[str, Any]]:
        assert self.log_path is not None
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                if isinstance(event, dict):
                    out.append(event)
        return out

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events() if e.get("event") == name]
            if found:
                return found[-1]
            assert self.proc is not None and self.log_path is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"inference-serve exited ({self.proc.returncode}):\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        raise TimeoutError(f"no {name} within {timeout} s")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, timeout)
        self.proc = None
