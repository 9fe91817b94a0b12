"""CUDA_VISIBLE_DEVICES read the way CUDA reads it: the one parser of it (coupled_net.slots,
coupled_net.machine). Pure: it names entries, it does not look for GPUs."""

from __future__ import annotations

import re

_LEADING_DIGITS = re.compile(r"\+?([0-9]+)")


def parse_cuda_visible(value: str | None) -> list[int | str] | None:
    """CUDA_VISIBLE_DEVICES' entries, in order: None when it is unset (every GPU is visible); else
    each comma-separated entry, whitespace around it ignored, as an index (int; CUDA reads it like
    strtoul, so `1gpu` is 1 — an index in CUDA_DEVICE_ORDER's order, which is NVML's only under
    PCI_BUS_ID) or a UUID (str, `GPU-…` or a MIG instance's `MIG-…`, perhaps only its first
    characters). CUDA stops at the first entry it cannot read (empty, `-1`, a word), so the list
    ends there: an empty string hides every GPU. An entry named twice hides every GPU too (CUDA's
    rule, as torch.cuda reads it): []."""
    if value is None:
        return None
    entries: list[int | str] = []
    for item in (v.strip() for v in value.split(",")):
        if item.startswith(("GPU-", "MIG-")) and len(item) > 4:
            entry: int | str = item
        else:
            digits = _LEADING_DIGITS.match(item)
            if digits is None:
                break
            entry = int(digits.group(1))
        if entry in entries:
            return []
        entries.append(entry)
    return entries
