"""File watching with watchdog: collects the paths that changed in the watched folders."""

from __future__ import annotations

import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

# Opening or reading a file is not a change: the daemon's own planner reads every recipe and image,
# and reacting to that would loop forever.
CHANGE_EVENTS = frozenset({"created", "modified", "moved", "deleted", "closed", "attrib"})


class _Collector(FileSystemEventHandler):
    def __init__(self, sink: "Watcher"):
        self.sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in CHANGE_EVENTS:
            return
        paths = [event.src_path]
        if getattr(event, "dest_path", ""):
            paths.append(event.dest_path)
        self.sink._add(Path(p if isinstance(p, str) else p.decode()) for p in paths)


class Watcher:
    """Watchdog observers on a set of paths; `drain()` returns the paths changed since last time.

    A folder is watched recursively; a single file is watched through its parent folder.
    """

    def __init__(self) -> None:
        self._observer = Observer()
        self._handler = _Collector(self)
        self._lock = threading.Lock()
        self._changed: list[Path] = []
        self._watches: dict[tuple[str, bool], object] = {}
        self._started = False

    def _add(self, paths) -> None:
        with self._lock:
            self._changed.extend(paths)

    def start(self) -> None:
        if not self._started:
            self._observer.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._started = False

    def watch(self, paths: set[Path], recursive_dirs: set[Path]) -> None:
        """Make the watched set exactly `paths` (non-recursive) plus `recursive_dirs`."""
        wanted: set[tuple[str, bool]] = set()
        for path in paths:
            wanted.add((str(path), False))
        for path in recursive_dirs:
            if path.is_dir():
                wanted.add((str(path), True))
            elif path.parent.is_dir():
                wanted.add((str(path.parent), False))
        for key in list(self._watches):
            if key not in wanted:
                self._observer.unschedule(self._watches.pop(key))
        for key in sorted(wanted - set(self._watches)):
            folder, recursive = key
            if Path(folder).is_dir():
                self._watches[key] = self._observer.schedule(self._handler, folder, recursive=recursive)

    @property
    def watched(self) -> list[str]:
        return sorted(folder for folder, _ in self._watches)

    def drain(self) -> list[Path]:
        with self._lock:
            changed, self._changed = self._changed, []
        return changed
