"""File-system watching (watchdog): wake the node when models, its config or the drop folder change.

Watchdog only says *that* something changed; the node then decides what to do from the files'
state (a model folder's signature, the config's content), so a missed or duplicated event is
harmless and a slow fallback poll covers file systems without inotify.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = structlog.get_logger(__name__)


class _Flag(FileSystemEventHandler):
    def __init__(self, name: str, wake: threading.Event, changed: set[str], lock: threading.Lock,
                 only: Path | None) -> None:
        self.name, self.wake, self.changed, self.lock, self.only = name, wake, changed, lock, only

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        if self.only is not None and Path(str(event.src_path)).name != self.only.name and Path(
                str(getattr(event, "dest_path", "") or "")).name != self.only.name:
            return
        with self.lock:
            self.changed.add(self.name)
            self.wake.set()


class Watcher:
    """Watches named folders (or single files, through their folder) and records which changed."""

    def __init__(self, targets: Iterable[tuple[str, Path]]) -> None:
        self.wake = threading.Event()
        self._changed: set[str] = set()
        self._lock = threading.Lock()
        self._observer: Any = Observer()
        for name, path in targets:
            folder, only = (path.parent, path) if path.is_file() or path.suffix else (path, None)
            if not folder.is_dir():
                log.warning("watch_target_missing", target=name, path=str(folder))
                continue
            self._observer.schedule(_Flag(name, self.wake, self._changed, self._lock, only), str(folder),
                                    recursive=only is None)

    def start(self) -> None:
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)

    def take(self) -> set[str]:
        """Return and clear the names of the targets that changed."""
        with self._lock:  # clear and swap together, so an event arriving now is kept for next time
            self.wake.clear()
            changed = set(self._changed)
            self._changed.clear()  # in place: the handlers hold this very set
        return changed
