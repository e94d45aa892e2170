"""A model's packed host weights in a named shared-memory file, so that a
second engine process on the host (a replacement for a crashed worker, a
reload after an unload) maps the same bytes instead of loading the model
again and holding a second copy.

The file is `<name>.weights` in a memory-backed directory (/dev/shm on Linux);
`<name>.weights.json` beside it says that the file is complete and which
tensor layout it holds. It is written last, by an atomic rename, so a reader
never maps a half-written copy: a file without it is being written (or its
writer died) and is not used. Whoever creates the file first writes it; the
agent that names the files removes them (engine_manager.py), since a
worker's copy must outlive the worker."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SUFFIX = ".weights"


def default_shared_dir() -> Path | None:
    """Where shared weights go by default: Linux's memory-backed /dev/shm, or nowhere."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "hugetlbfs"})


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding path (Linux's mount table), or None where unknown."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    target = str(Path(path).resolve())
    best, fstype = "", None
    for line in lines:  # "<id> <parent> <dev> <root> <mount point> <options> ... - <fstype> <source> <options>"
        fields, _, rest = line.partition(" - ")
        mount_point = fields.split()[4].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):  # the last mount over a point wins
            best, fstype = mount_point, rest.split()[0]
    return fstype


def check_shared_dir(path: Path) -> None:
    """Raises ValueError unless path can hold shared weights that CUDA can pin:
    cudaHostRegister refuses mappings of disk files (measured on our H100
    host: bench/probe/shared_register.py), so the files must be in memory."""
    if not path.is_dir():
        raise ValueError(f"shared weights directory {path} does not exist")
    fstype = filesystem_type(path)
    if fstype is not None and fstype not in MEMORY_FILESYSTEMS:
        raise ValueError(
            f"shared weights directory {path} is on {fstype}, not in memory (tmpfs, like /dev/shm): "
            "CUDA cannot pin a disk file's pages"
        )


def layout_digest(tensors: list[torch.Tensor], offsets: list[int], nbytes: int) -> str:
    """Identifies a packing: the same model class and config give the same digest."""
    h = hashlib.sha256(str(nbytes).encode())
    for t, off in zip(tensors, offsets):
        h.update(f"{off}:{t.dtype}:{tuple(t.shape)};".encode())
    return h.hexdigest()


def shared_weights_name(prefix: str, model_path: str, load_format: str, dtype: str, seed: int, device_kind: str) -> str:
    """The file name of one model's shared copy. Everything that changes the
    bytes is in it: the checkpoint files' sizes and times (a model replaced on
    disk gets a new copy), the load format and seed (dummy weights), the dtype
    and the device kind ("auto" resolves to float32 on the CPU, the config's
    dtype on a GPU)."""
    h = hashlib.sha256(f"{Path(model_path).resolve()}|{load_format}|{dtype}|{seed}|{device_kind}".encode())
    model_dir = Path(model_path)
    if model_dir.is_dir():
        for f in sorted(model_dir.iterdir()):
            if f.suffix in (".json", ".safetensors") and f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return f"{prefix}-{h.hexdigest()[:20]}{SUFFIX}"


@dataclass(frozen=True)
class SharedWeightsFile:
    path: Path

    @property
    def marker(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    def open_complete(self, digest: str, nbytes: int) -> torch.Tensor | None:
        """The whole copy, mapped, if a complete one with this layout exists; None otherwise."""
        try:
            meta = json.loads(self.marker.read_text())
            size = self.path.stat().st_size
        except (OSError, ValueError):
            return None
        if meta != {"nbytes": nbytes, "layout": digest} or size != nbytes:
            log.warning("shared weights %s hold another layout; not used", self.path)
            return None
        return torch.from_file(str(self.path), shared=True, size=nbytes, dtype=torch.uint8)

    def create(self, nbytes: int) -> torch.Tensor | None:
        """A new, mapped file of nbytes for the creator to fill, or None when one
        exists (another process writes it) or the directory has no room."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return None
        except OSError as exc:
            log.warning("cannot create shared weights %s: %s", self.path, exc)
            return None
        try:
            # Reserving every page now makes a full tmpfs fail here (ENOSPC)
            # instead of killing the process with SIGBUS at a later write.
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)
            else:
                os.ftruncate(fd, nbytes)
        except OSError as exc:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            log.warning(
                "no room for %d MB of shared weights in %s (%s); keeping a private copy",
                nbytes >> 20,
                self.path.parent,
                exc,
            )
            return None
        os.close(fd)
        return torch.from_file(str(self.path), shared=True, size=nbytes, dtype=torch.uint8)

    def mark_complete(self, digest: str, nbytes: int) -> None:
        tmp = self.marker.with_name(f"{self.marker.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"nbytes": nbytes, "layout": digest}))
        os.replace(tmp, self.marker)

    def remove(self) -> None:
        """Unlinks the copy; processes that map it keep their mapping until they end."""
        self.marker.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


def remove_shared_weights(directory: Path, prefix: str) -> int:
    """Removes every shared copy named with prefix (a crashed agent's leftovers); returns how many."""
    removed = 0
    for f in directory.glob(f"{prefix}-*{SUFFIX}*"):
        f.unlink(missing_ok=True)
        removed += f.name.endswith(SUFFIX)
    return removed
