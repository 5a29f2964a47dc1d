"""/proc/PID/maps lines: the address range, device, inode and path of each mapping."""

from __future__ import annotations

import os
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
