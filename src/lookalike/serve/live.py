"""The served gallery as it is now: `lookalike serve` watches the index folder's manifest.json and, when an update
(`lookalike index add/remove`, POST /items, DELETE /items/{id}) has switched generations, loads the new gallery and
swaps it in between searches. Every search takes one GalleryIndex and uses it to the end, so it sees the old or the new
gallery, never a mix."""

from __future__ import annotations

import os
import threading

from lookalike.core.errors import LookalikeError
from lookalike.serve.index import GalleryIndex, load_index
from lookalike.serve.manifest import MANIFEST_FILE, read_manifest


class LiveIndex:
    """A GalleryIndex that follows its folder's generations (a stat of manifest.json per request; a reload only when it
    changed)."""

    def __init__(self, index: GalleryIndex) -> None:
        self.index = index
        self.manifest = None if index.folder is None else index.folder / MANIFEST_FILE
        self.seen = self._stamp()
        self.lock = threading.Lock()  # one reload at a time (requests on several threads may see the change)

    def _stamp(self) -> tuple[int, int, int] | None:
        """manifest.json's inode, size and mtime: an update renames a new file into place, so the inode changes."""
        if self.manifest is None:
            return None
        try:
            stat = os.stat(self.manifest)
        except OSError:  # the folder being replaced by a rebuild: try again at the next request
            return None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def current(self) -> GalleryIndex:
        """The gallery to answer this request with: the newest generation on disk (the one held when it cannot be read
        yet; the next request tries again)."""
        stamp = self._stamp()
        if stamp == self.seen:
            return self.index
        with self.lock:
            if stamp != self.seen:
                try:
                    self.index = self._reloaded()
                    self.seen = stamp
                except (LookalikeError, OSError):
                    pass  # a generation removed while we read it: a newer one is in place, read at the next request
            return self.index

    def _reloaded(self) -> GalleryIndex:
        """The folder's newest gallery: an update (same build) reuses the loaded model; a rebuild loads everything."""
        manifest = read_manifest(self.index.folder)
        if manifest.created_at == self.index.manifest.created_at:  # updates keep the build's time; rebuilds do not
            return self.index.refreshed(manifest)
        return load_index(self.index.folder, self.index.runtime)
