"""A BPF ring buffer read from Python through mmap (no libbcc): the
consumer position page (read-write), then the producer position page and
the data area mapped twice (read-only), as the kernel lays them out."""

from __future__ import annotations

import mmap
import struct

from meshagent.bpf.syscall import map_info

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER = 8
_HEADER = struct.Struct("=II")  # a record's length (with BUSY, DISCARD) and page offset


class RingBuf:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = map_info(fd).max_entries  # the data area, a power of two
        self.mask = self.size - 1
        page = mmap.PAGESIZE
        self.consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.producer = mmap.mmap(
            fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )
        self.data = page  # where the data area starts in self.producer

    def read(self, limit: int = 4096) -> list[bytes]:
        """The records written since the last read (at most limit)."""
        out: list[bytes] = []
        cons = start = struct.unpack_from("=Q", self.consumer, 0)[0]
        prod = struct.unpack_from("=Q", self.producer, 0)[0]
        producer, data, mask, header = self.producer, self.data, self.mask, _HEADER.unpack_from
        while cons < prod and len(out) < limit:
            at = data + (cons & mask)
            length, _pgoff = header(producer, at)
            if length & BUSY:
                break  # still being written
            size = length & ~(BUSY | DISCARD)
            if not length & DISCARD:
                out.append(producer[at + HEADER : at + HEADER + size])
            cons += (size + HEADER + 7) & ~7
        if cons != start:  # once per batch: the space is the kernel's again
            struct.pack_into("=Q", self.consumer, 0, cons)
        return out

    def close(self) -> None:
        self.consumer.close()
        self.producer.close()
