"""Probe: can two processes pin (cudaHostRegister) the same shared-memory file's pages at once?
Prints one line per case. python bench/probe/shared_register.py"""

import multiprocessing as mp
import os
import tempfile

import torch


def register(path: str, nbytes: int, q, hold) -> None:
    t = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 1))
    q.put(err)
    hold.wait()


def case(nbytes: int, concurrent: bool, directory: str = "/dev/shm") -> str:
    d = tempfile.mkdtemp(dir=directory)
    path = os.path.join(d, "w")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.posix_fallocate(fd, 0, nbytes)
    os.close(fd)
    ctx = mp.get_context("spawn")
    q, hold = ctx.Queue(), ctx.Event()
    errs = []
    procs = []
    for _ in range(2):
        p = ctx.Process(target=register, args=(path, nbytes, q, hold))
        p.start()
        procs.append(p)
        errs.append(q.get())
        if not concurrent:
            hold.set()
            p.join()
            hold = ctx.Event()
    hold.set()
    for p in procs:
        p.join()
    pages = "page multiple" if nbytes % 4096 == 0 else "not a page multiple"
    together = "both alive" if concurrent else "one after the other"
    return f"in {directory}: {nbytes} bytes ({pages}), {together}: errors {errs}"


if __name__ == "__main__":
    import sys

    for directory in sys.argv[1:] or ["/dev/shm", tempfile.gettempdir()]:
        for n in (558592, 2 << 20):
            print(case(n, True, directory), flush=True)
