"""VisDial ``answer_options`` lists (100 indices per round) parsed in bulk, on one or two cores.

Why: the option indices are ~75% of a VisDial file's bytes (82.8M integers in train), and the
cheapest parser at hand (simdjson) needs ~12 ns per integer on this machine: they set the speed of
the JSON phase. So they are parsed in chunks of rounds: a chunk's lists are joined into one flat
JSON array with a ``-1`` after each list, parsed at once into an int64 buffer (no Python int per
option) and checked in bulk. The ``-1`` separators must sit at every 101st place and be the only
``-1`` values, which proves that each list held exactly 100 integers; anything else (a float, a
string, a nested list, a wrong count) fails the chunk, and the caller falls back.

On a large file, one helper process shares the chunks. The file is read into a memfd that both
map (one snapshot), piece by piece, and the caller hands over the lists' positions as it finds
them, so the helper parses from the front while the caller is still reading and then decoding
the rest of the file; afterwards the caller takes chunks from the back until the two meet. The
caller redoes whatever the helper left undone, so a helper that never starts or dies costs speed,
never results. It is a fresh interpreter that imports numpy and simdjson only (this module), not
a fork of the caller, whose threads (Prefect, lancedb) make fork unsafe.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import simdjson

log = logging.getLogger(__name__)

_SEP, _END = b",-1,", b",-1]"
_INT32_MAX = np.iinfo(np.int32).max
CHUNK_ROUNDS = 1024  # ~300 KB of JSON per parse: the buffers stay in cache
PIECE_BYTES = 16 * 2**20  # the file is read and scanned this much at a time

# chunk states in the work area
_FREE, _MAIN_BUSY, _HELPER_BUSY, _DONE, _HELPER_DONE, _FAILED = range(6)


def parse_joined(parser: simdjson.Parser, doc: bytes, out: np.ndarray, span: np.ndarray) -> bool:
    """Parse ``[list,-1,list,-1,...,list,-1]`` (lists bare or bracketed) into ``out`` (k, width) int32.

    Values are clipped to -1..int32 max (anything clipped is out of range anyway); ``span`` gets
    the smallest and largest value. False if the document is not exactly k lists of ``width``
    integers.
    """
    k, width = out.shape
    try:
        values = np.frombuffer(parser.parse(doc).as_buffer(of_type="i"), np.int64)
    except (TypeError, ValueError, RuntimeError):  # not JSON, not integers, or past int64
        return False
    if values.size != k * (width + 1):
        return False
    rows = values.reshape(k, width + 1)
    if not (rows[:, width] == -1).all():
        return False
    lists = rows[:, :width]
    low, high = lists.min(), lists.max()
    if low < -1 or high > _INT32_MAX:
        np.clip(lists, -1, _INT32_MAX, out=out, casting="unsafe")
    else:
        out[...] = lists
    span[:] = min(max(low, -1), _INT32_MAX), min(max(high, -1), _INT32_MAX)
    # A -1 in the data could stand in for a missing separator: then the count gives it away.
    return low >= 0 or np.count_nonzero(values == -1) == k


def parse_spans(parser: simdjson.Parser, data, starts: np.ndarray, ends: np.ndarray, out: np.ndarray,
                span: np.ndarray) -> bool:
    """Parse the lists whose contents (inside the brackets) are ``data[starts[i]:ends[i]]``."""
    pieces = list(map(data.__getitem__, map(slice, starts.tolist(), ends.tolist())))
    pieces[0] = b"[" + pieces[0]
    pieces[-1] = pieces[-1] + _END
    return parse_joined(parser, _SEP.join(pieces), out, span)


class _Work:
    """Chunk states, the lists' spans, the values (n, width) int32 and each chunk's smallest and
    largest value, in one buffer (shared with the helper, or private)."""

    def __init__(self, buffer, capacity: int, chunk: int, width: int) -> None:
        n_chunks = _ceil_div(capacity, chunk)
        head = _ceil_div(n_chunks, 64) * 64
        self.states = np.frombuffer(buffer, np.uint8, n_chunks)
        self.spans = np.frombuffer(buffer, np.int32, 2 * n_chunks, head).reshape(n_chunks, 2)
        head += 8 * n_chunks
        self.starts = np.frombuffer(buffer, np.int64, capacity, head)
        self.ends = np.frombuffer(buffer, np.int64, capacity, head + 8 * capacity)
        self.out = np.frombuffer(buffer, np.int32, capacity * width, head + 16 * capacity).reshape(capacity, width)
        self.chunk = chunk

    @staticmethod
    def size(capacity: int, chunk: int, width: int) -> int:
        n_chunks = _ceil_div(capacity, chunk)
        return _ceil_div(n_chunks, 64) * 64 + 8 * n_chunks + capacity * (16 + 4 * width)

    def run(self, parser: simdjson.Parser, data, c: int, n: int, done: int) -> bool:
        s = slice(c * self.chunk, min(n, (c + 1) * self.chunk))
        ok = parse_spans(parser, data, self.starts[s], self.ends[s], self.out[s], self.spans[c])
        self.states[c] = done if ok else _FAILED
        return ok


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _anonymous(size: int) -> mmap.mmap:
    """Private zeroed memory in small pages: no stall compacting memory for huge pages, as a big
    numpy array can meet on a busy machine; untouched pages cost nothing."""
    return mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class FileBytes:
    """A file's bytes in a writable buffer that is filled piece by piece (scanning can start on the
    first piece): a memfd that the kernel copies into (``fd``, which a helper maps too), or a
    bytearray where there is no memfd."""

    def __init__(self, path: Path, fd: int | None = None) -> None:
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 - see close()
        st = os.fstat(self.file.fileno())
        if not stat.S_ISREG(st.st_mode):  # a pipe, say: no size to plan with, read it all at once
            self.buf, self.fd, self._own_fd = bytearray(self.file.readall()), None, None
            self.size = self.got = len(self.buf)
            return
        self.size = st.st_size
        if fd is None and hasattr(os, "memfd_create"):
            fd = os.memfd_create("visdial-json", os.MFD_CLOEXEC)
            self._own_fd = fd
        else:
            self._own_fd = None
        self.fd, self.got = fd, 0
        if fd is not None and self.size:
            os.ftruncate(fd, self.size)
            self.buf = mmap.mmap(fd, self.size)
        else:
            self.buf = bytearray(self.size)

    def pieces(self, piece: int = PIECE_BYTES) -> Iterator[tuple[int, int]]:
        """Read on, piece by piece; yield each piece's range once it is in the buffer."""
        while self.got < self.size:
            want = min(piece, self.size - self.got)
            if self.fd is not None:
                n = os.sendfile(self.fd, self.file.fileno(), self.got, want)
            else:
                n = self.file.readinto(memoryview(self.buf)[self.got : self.got + want])
            if not n:  # the file shrank while it was read
                break
            self.got += n
            yield self.got - n, self.got

    def close(self) -> None:
        """Close the file (the buffer stays)."""
        self.file.close()
        if self._own_fd is not None:
            os.close(self._own_fd)
            self._own_fd = None


class OptionsHelper:
    """One helper process. Spawn it before reading the file, so that its start-up overlaps that."""

    def __init__(self) -> None:
        self.data_fd = os.memfd_create("visdial-json", os.MFD_CLOEXEC)
        self.work_fd = os.memfd_create("visdial-options", os.MFD_CLOEXEC)
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115 - a pipe could fill up and block it
        root = str(Path(__file__).resolve().parents[1])
        code = (f"import sys; sys.path.insert(0, {root!r}); from tasks.visdial_options import helper_main; "
                "helper_main(int(sys.argv[1]), int(sys.argv[2])); import os; os._exit(0)")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(self.data_fd), str(self.work_fd)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.errors,
            pass_fds=(self.data_fd, self.work_fd),
        )

    @classmethod
    def spawn(cls) -> OptionsHelper | None:
        """A helper, or None where there is no second core or no memfd (then one process does it all)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if cores < 2 or not hasattr(os, "memfd_create"):
            return None
        try:
            return cls()
        except OSError as exc:
            log.warning("no options helper process: %s", exc)
            return None

    def say(self, line: str) -> None:
        try:
            os.write(self.proc.stdin.fileno(), line.encode() + b"\n")
        except OSError:  # it died: the caller does every chunk
            pass

    def close(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` for it to finish (then its results are all written), else stop it."""
        if timeout and self.proc.poll() is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("options helper still busy after %.0f s: stopping it", timeout)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        if not self.errors.closed:
            if self.proc.returncode not in (0, -9):
                self.errors.seek(0)
                err = self.errors.read()[-2000:].decode(errors="replace")
                log.warning("options helper exited with %s: %s", self.proc.returncode, err)
            self.errors.close()
        for fd in (self.data_fd, self.work_fd):
            if fd >= 0:
                os.close(fd)
        self.data_fd = self.work_fd = -1


class OptionsJob:
    """Parse lists at ``data[start:end]`` spans, handed over with :meth:`add` as they are found,
    into an (n, width) int32 array. With a helper, it starts on them at once."""

    def __init__(self, data, capacity: int, width: int, helper: OptionsHelper | None,
                 chunk: int = CHUNK_ROUNDS) -> None:
        self.data, self.capacity, self.chunk, self.helper, self.n = data, capacity, chunk, helper, 0
        size = _Work.size(capacity, chunk, width)
        if helper:
            os.ftruncate(helper.work_fd, size)
            self.work = _Work(mmap.mmap(helper.work_fd, size), capacity, chunk, width)
            helper.say(f"{len(data)} {capacity} {chunk} {width}")
        else:
            self.work = _Work(_anonymous(size), capacity, chunk, width)

    def add(self, starts: np.ndarray, ends: np.ndarray) -> bool:
        """Hand over more spans (in file order). False if there are more than ``capacity``."""
        n = self.n + len(starts)
        if n > self.capacity:
            return False
        self.work.starts[self.n : n], self.work.ends[self.n : n] = starts, ends
        self.n = n
        if self.helper and len(starts):
            self.helper.say(str(n))
        return True

    def finish(self, helper_timeout: float = 300.0) -> tuple[np.ndarray, int, int] | None:
        """(n, width) values, the smallest and the largest; None if a list is malformed."""
        work, n, parser = self.work, self.n, simdjson.Parser()
        states = work.states[: _ceil_div(n, self.chunk)]
        if self.helper:
            self.helper.say(f"end {n}")
        for c in reversed(range(len(states))):  # from the back, until the helper's chunks
            if states[c] != _FREE:
                break
            states[c] = _MAIN_BUSY
            if not work.run(parser, self.data, c, n, _DONE):
                return None
        if self.helper:  # it has exited once it meets our chunks: then all it wrote is there
            helped = np.isin(states, (_HELPER_BUSY, _HELPER_DONE, _FAILED)).any()
            self.helper.close(helper_timeout if helped else None)
        if (states == _FAILED).any():
            return None
        for c in np.flatnonzero((states != _DONE) & (states != _HELPER_DONE)):  # what a dead helper left
            if not work.run(parser, self.data, int(c), n, _DONE):
                return None
        spans = work.spans[: len(states)]
        if not len(spans):
            return work.out[:0], 0, 0
        return work.out[:n], int(spans[:, 0].min()), int(spans[:, 1].max())


def helper_main(data_fd: int, work_fd: int) -> None:
    """The helper process: parse chunks from the front as their spans arrive, until it meets a
    chunk the caller has taken (or one fails: then the caller falls back anyway)."""
    lines = iter(sys.stdin.buffer.readline, b"")
    first = next(lines, b"").split()
    if not first:
        return
    size, capacity, chunk, width = map(int, first)
    data = mmap.mmap(data_fd, size, access=mmap.ACCESS_READ)
    work = _Work(mmap.mmap(work_fd, _Work.size(capacity, chunk, width)), capacity, chunk, width)
    parser, c, n, final = simdjson.Parser(), 0, 0, False
    while True:
        ready = _ceil_div(n, chunk) if final else n // chunk
        while c < ready:
            if work.states[c] != _FREE:
                return
            work.states[c] = _HELPER_BUSY
            if not work.run(parser, data, c, n, _HELPER_DONE):
                return
            c += 1
        if final:
            return
        words = next(lines, b"end -1").split()
        final, n = words[0] == b"end", int(words[-1])
        if n < 0:
            return
