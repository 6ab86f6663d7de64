"""The compression methods controller and agent agree on: names, whether lossy, and what each promises.

No torch here: the controller imports this to validate requests and to name the known methods in
its errors. The codecs themselves live in kvbus.agent.codecs. `cachegen` is LMCache's own method:
the controller passes it to workers like any other, LMCache workers (through the bridge) run it,
and kvbus's agents refuse it, saying so.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    lossless: bool
    description: str
    error_bound: str | None = None  # what a lossy method promises; None where the round trip is exact
    in_kvbus: bool = True  # kvbus's agents implement it; False: only LMCache workers do


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "int8",
            lossless=False,
            description="per-channel symmetric int8 quantization with a float32 scale per channel",
            error_bound="|x - x'| <= max|x_c| / 254 for every value of channel c, a column of the last "
            "dimension (of one K or V of one layer in KV_2LTD: per index of the first two "
            "dimensions of a tensor of 4 or more), plus rounding the result to the stored "
            "dtype, at most eps/2 of it (|x'| / 256 for bfloat16, / 2048 for float16)",
        ),
        Method(
            "zlib",
            lossless=True,
            description="zlib (level 1) over the tensor's bytes grouped by byte position; bit-exact, any dtype",
        ),
        Method(
            "zstd",
            lossless=True,
            description="zstd (level 1) over each byte position's plane of the tensor's bytes, a plane it cannot "
            "shrink kept raw; bit-exact, any dtype; smaller than zlib on KV and over 10x faster",
        ),
        Method(
            "cachegen",
            lossless=False,
            description="LMCache's CacheGen codec (quantized, arithmetic-coded KV), run by LMCache workers",
            error_bound="LMCache's: quantization of a few bits per value, set per model and layer by cachegen's "
            "settings in LMCache",
            in_kvbus=False,
        ),
    )
}

KNOWN = ", ".join(METHODS)
IN_KVBUS = ", ".join(name for name, method in METHODS.items() if method.in_kvbus)


def method(name: str) -> Method:
    """The method called `name`; ValueError naming the known ones if there is none."""
    found = METHODS.get(name)
    if found is None:
        raise ValueError(f"unknown compression method {name!r}; known methods: {KNOWN}")
    return found
