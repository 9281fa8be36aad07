"""Tiny host-side descriptions of attention masks. No device work happens at construction: device
copies of the metadata are made lazily, once per device, and cached on the layout."""
from __future__ import annotations

import itertools
import numbers

import torch


class ScaleLayout:
    """A multi-scale token sequence: scale i holds sizes[i] tokens, laid out one scale after another.

    ScaleLayout(patch_nums) takes VAR-style side lengths (scale i has pn_i^2 tokens);
    ScaleLayout.from_sizes(sizes) takes token counts directly (non-square scales, FlexVAR schedules).

    >>> lay = ScaleLayout((1, 2, 3))
    >>> lay.sizes, lay.offsets, lay.L
    ((1, 4, 9), (0, 1, 5, 14), 14)
    """

    __slots__ = ("sizes", "offsets", "L", "_device_offsets")

    def __init__(self, patch_nums):
        pns = _positive_ints(patch_nums, "patch_nums")
        self._init_sizes(tuple(p * p for p in pns))

    @classmethod
    def from_sizes(cls, sizes) -> "ScaleLayout":
        obj = cls.__new__(cls)
        obj._init_sizes(_positive_ints(sizes, "sizes"))
        return obj

    def _init_sizes(self, sizes):
        self.sizes = tuple(sizes)
        self.offsets = tuple(itertools.accumulate(self.sizes, initial=0))
        if self.offsets[-1] >= 2**31:
            raise ValueError(f"ScaleLayout: total length {self.offsets[-1]} does not fit int32")
        self.L = self.offsets[-1]
        self._device_offsets = {}

    @property
    def num_scales(self) -> int:
        return len(self.sizes)

    def offsets_tensor(self, device) -> torch.Tensor:
        """int32 cumulative offsets on `device` (cached per device)."""
        key = str(torch.device(device))
        t = self._device_offsets.get(key)
        if t is None:
            t = torch.tensor(self.offsets, dtype=torch.int32, device=device)
            self._device_offsets[key] = t
        return t

    def scale_ids(self, device=None) -> torch.Tensor:
        """(L,) int64 index of the scale of every token."""
        return torch.repeat_interleave(torch.arange(self.num_scales, device=device),
                                       torch.tensor(self.sizes, device=device))

    def __eq__(self, other):
        return isinstance(other, ScaleLayout) and self.sizes == other.sizes

    def __hash__(self):
        return hash(("ScaleLayout", self.sizes))

    def __repr__(self):
        return f"ScaleLayout.from_sizes({list(self.sizes)})  # L={self.L}"

    def __getstate__(self):
        return {"sizes": self.sizes}

    def __setstate__(self, state):
        self._init_sizes(state["sizes"])


def _positive_ints(values, name):
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"ScaleLayout: {name} must be a sequence of positive ints, got {type(values).__name__}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"ScaleLayout: {name}[{i}] must be an int, got {v!r}")
        if v <= 0:
            raise ValueError(f"ScaleLayout: {name}[{i}] must be positive, got {v}")
        out.append(int(v))
    if not out:
        raise ValueError(f"ScaleLayout: {name} must not be empty")
    return tuple(out)


VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
VAR_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


def main():
    """Print the two next-scale masks of a tiny schedule, attention-gym style."""
    lay = ScaleLayout((1, 2, 3))
    ids = lay.scale_ids()
    for name, mask in (("causal", ids[None, :] <= ids[:, None]), ("diagonal", ids[None, :] == ids[:, None])):
        print(f"pattern={name!r}  {lay!r}")
        for row in mask.tolist():
            print("  " + "".join("#" if x else "." for x in row))


if __name__ == "__main__":
    main()
