"""The ledger's crash journal: usage records appended to local segment files before the
response that reports them completes, so a killed process loses nothing it metered.

Each record is one JSON line written with a single `os.write` to a file opened with
`O_APPEND`. The bytes are in the kernel's page cache when the call returns, so they survive
the process being killed (SIGKILL included) without an fsync; they do not survive the
machine losing power (see docs/billing.md).

A journal is a directory of segments named `<pid>-<sequence>.jsonl`. The process writing a
segment holds an exclusive `flock` on it; the lock dies with the process. A segment that
can be locked therefore belongs to nobody: its owner has stopped (cleanly or not), and
whoever opens the ledger next replays it. Several processes may share one directory.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from billing.record import UsageRecord

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".jsonl"

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(UsageRecord)


def encode_record(rec: UsageRecord) -> bytes:
    """One record as one JSON line."""
    return _encoder.encode(rec) + b"\n"


def decode_records(data: bytes, source: str = "") -> list[UsageRecord]:
    """Records from journal bytes; a torn or corrupt line is logged and skipped."""
    records: list[UsageRecord] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(_decoder.decode(line))
        except msgspec.DecodeError:
            log.warning("skipping unreadable journal line %s:%d", source, number)
    return records


@dataclass(slots=True)
class OrphanSegment:
    """A segment left by a stopped process, locked by us while we replay it."""

    path: Path
    fd: int

    def read(self) -> list[UsageRecord]:
        with open(self.fd, "rb", closefd=False) as file:
            file.seek(0)
            return decode_records(file.read(), str(self.path))

    def discard(self) -> None:
        """Delete the segment (its records are in the database) and drop the lock."""
        self.path.unlink(missing_ok=True)
        os.close(self.fd)

    def release(self) -> None:
        """Keep the segment for a later replay and drop the lock."""
        os.close(self.fd)


class Journal:
    """Append-only segment files in one directory, owned by this process."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._sequence = 0
        self._fd = -1
        self._path: Path | None = None
        self._closed_segments: list[Path] = []
        self._line = bytearray()  # `append`'s encoding buffer

    def open(self) -> None:
        """Create the directory and start a fresh segment."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._start_segment()

    def orphans(self) -> Iterator[OrphanSegment]:
        """Segments nobody holds (their writer stopped), each locked for the caller."""
        for path in sorted(self.directory.glob(f"*{SEGMENT_SUFFIX}")):
            if path == self._path or path in self._closed_segments:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # a live process owns it
                continue
            if not path.exists():  # replayed and deleted by someone else meanwhile
                os.close(fd)
                continue
            yield OrphanSegment(path, fd)

    def append(self, rec: UsageRecord) -> None:
        """Write one record with a single system call; raises if it could not be written."""
        # Encoded into one reused buffer, newline included: no intermediate bytes objects.
        line = self._line
        _encoder.encode_into(rec, line)
        line += b"\n"
        written = os.write(self._fd, line)
        if written != len(line):  # a full disk; the line is torn and will be skipped
            raise OSError(f"journal write to {self._path} was short ({written}/{len(line)})")

    def append_many(self, records: list[UsageRecord]) -> None:
        """Write several records with one system call (nothing when the list is empty)."""
        if not records:
            return
        data = _encoder.encode_lines(records)
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"journal write to {self._path} was short ({written}/{len(data)})")

    def rotate(self) -> None:
        """Close the current segment and start a new one.

        Every record appended before this call is in a closed segment; `discard_closed`
        deletes those once their records are committed to the database.
        """
        if self._path is not None:
            self._closed_segments.append(self._path)
        previous = self._fd
        self._start_segment()
        if previous >= 0:
            os.close(previous)  # drops the lock: a crash now makes it replayable

    def discard_closed(self) -> None:
        """Delete the closed segments (everything in them has been committed)."""
        for path in self._closed_segments:
            path.unlink(missing_ok=True)
        self._closed_segments.clear()

    def close(self, discard: bool) -> None:
        """Stop writing; with `discard`, delete every segment (all records are committed)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if discard:
            if self._path is not None:
                self._closed_segments.append(self._path)
            self.discard_closed()
        self._path = None

    def _start_segment(self) -> None:
        # Created under a name replay ignores, locked, then renamed into place: a segment is
        # never visible to another process's replay without its owner's lock on it.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        while True:
            self._sequence += 1
            path = self.directory / f"{os.getpid()}-{self._sequence:09d}{SEGMENT_SUFFIX}"
            if path.exists():  # left by an earlier process that had the same pid
                continue
            staging = path.with_name(path.name + ".new")
            try:
                fd = os.open(staging, flags, 0o600)
            except FileExistsError:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(staging, path)
            break
        self._fd = fd
        self._path = path
