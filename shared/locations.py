"""Where an agent keeps chunks. The names are LMCache's backend names, which `/clear` takes as `location`."""

from __future__ import annotations

from enum import StrEnum


class Location(StrEnum):
    CPU = "LocalCPUBackend"
    GPU = "LocalGPUBackend"
    DISK = "LocalDiskBackend"


KNOWN = ", ".join(location.value for location in Location)

# When one chunk sits in several places, lookup names the fastest.
FASTEST_FIRST = (Location.GPU, Location.CPU, Location.DISK)
