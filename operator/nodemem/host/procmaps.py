"""/proc/PID/maps lines: the address range, device, inode and path of each mapping."""

from __future__ import annotations

import os
import re
from collections.abc import Set
from dataclasses import dataclass


class MapsParseError(ValueError):
    pass


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    dev: int
    inode: int
    path: str  # "" for anonymous private memory; may end in " (deleted)"

    @property
    def range_name(self) -> str:
        """The entry's name under /proc/PID/map_files/."""
        return f"{self.start:x}-{self.end:x}"


# address perms offset dev inode path, for lines that name something.
_FILE_LINE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) \S{4} [0-9a-f]+ ([0-9a-f]+:[0-9a-f]+) ([0-9]+) +(.+)$",
    re.MULTILINE,
)


def file_mappings(text: str, boring_devs: Set[str]) -> list[Mapping]:
    """File-backed mappings whose device (as maps prints it, `fd:00`) is not boring.

    The fast path of the attribution scan: a Python process maps ~100 files, nearly
    all of them libraries on the root filesystem; one regex pass in C skips them.
    """
    mappings = []
    for start, end, dev, inode, path in _FILE_LINE.findall(text):
        if dev in boring_devs:
            continue
        major, minor = dev.split(":")
        mappings.append(
            Mapping(
                start=int(start, 16),
                end=int(end, 16),
                perms="",
                dev=os.makedev(int(major, 16), int(minor, 16)),
                inode=int(inode),
                path=path,
            )
        )
    return mappings


def maps_dev(dev: int) -> str:
    """A device number as /proc/PID/maps prints it (`%02x:%02x`)."""
    return f"{os.major(dev):02x}:{os.minor(dev):02x}"


def parse_maps(text: str) -> list[Mapping]:
    mappings = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line:
            continue
        # address perms offset dev inode [path]; the path may contain spaces.
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            raise MapsParseError(f"maps line {number}: malformed: {line!r}")
        address, perms, _offset, dev, inode = fields[:5]
        try:
            start, end = (int(part, 16) for part in address.split("-"))
            major, minor = (int(part, 16) for part in dev.split(":"))
            mapping = Mapping(
                start=start,
                end=end,
                perms=perms,
                dev=os.makedev(major, minor),
                inode=int(inode),
                path=fields[5] if len(fields) == 6 else "",
            )
        except (ValueError, OverflowError):
            raise MapsParseError(f"maps line {number}: malformed: {line!r}") from None
        if end < start or len(perms) != 4 or mapping.inode < 0:
            raise MapsParseError(f"maps line {number}: malformed: {line!r}")
        mappings.append(mapping)
    return mappings
