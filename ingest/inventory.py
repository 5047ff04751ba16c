"""What a recorded stream file holds, read end to end: `streamcl stream inspect`.

Every frame is decoded against the header's spec, as a replay would, so the counts
here are the ones a replay starts from: valid messages per class and task, invalid
ones per reason, and the file's damaged regions. For streams built with label noise,
the held-out sidecar's ground truth says how many labels were corrupted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamcl.ingest import heldout as heldout_io
from streamcl.ingest.codec import decode
from streamcl.ingest.recorded import CorruptFrame, StreamReader, StreamTally
from streamcl.ingest.schema import NO_TASK, Rejected, StreamSpec


@dataclass
class Inventory:
    """Counts over one stream file; `corrupted` is None without a held-out sidecar."""

    path: Path
    header: dict[str, Any]
    spec: StreamSpec
    tally: StreamTally
    classes: Counter[int] = field(default_factory=Counter)
    tasks: Counter[int] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    heldout: Path | None = None
    corrupted: Counter[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "size_bytes": self.tally.file_size,
            "header": {k: v for k, v in self.header.items() if k != "spec"},
            "spec": self.spec.to_dict(),
            "messages_valid": sum(self.classes.values()),
            "messages_rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "per_class": {str(k): v for k, v in sorted(self.classes.items())},
            "per_task": {str(k): v for k, v in sorted(self.tasks.items())},
            "heldout": str(self.heldout) if self.heldout else None,
            "corrupted_labels": None if self.corrupted is None else sum(self.corrupted.values()),
            "corrupted_per_class": None
            if self.corrupted is None
            else {str(k): v for k, v in sorted(self.corrupted.items())},
            "stream_damage": self.tally.to_dict(),
        }

    def lines(self) -> list[str]:
        """A terminal summary, one fact per line."""
        meta = ", ".join(f"{k}={v}" for k, v in self.header.items() if k != "spec")
        spec = self.spec
        lines = [
            f"file          {self.path} ({self.tally.file_size} bytes)",
            f"spec          feature_shape {spec.feature_shape}, dtype {spec.dtype}, "
            f"{spec.num_classes} classes",
            f"header        {meta or '(no provenance)'}",
            f"frames        {self.tally.frames} read"
            + (f" of {self.tally.expected} announced" if self.tally.expected is not None else ""),
            f"valid         {sum(self.classes.values())}",
            f"rejected      {sum(self.rejected.values())} "
            f"{dict(sorted(self.rejected.items())) or ''}".rstrip(),
            f"per class     {_counts(self.classes)}",
            f"per task      {_counts(self.tasks)}",
        ]
        if self.corrupted is None:
            lines.append("label noise   unknown (no held-out sidecar with ground truth)")
        else:
            lines.append(
                f"label noise   {sum(self.corrupted.values())} corrupted labels "
                f"(ground truth: {self.heldout}) per class {_counts(self.corrupted)}"
            )
        lines.append(f"damage        {self.tally.problem() or 'none'}")
        lines += [f"  byte {r.position}: {r.size} bytes, {r.detail}" for r in self.tally.damaged]
        return lines


def take_inventory(path: str | Path, heldout: str | Path | None = None) -> Inventory:
    """Read `path` end to end; `heldout` (default: the sidecar, if any) gives noise flags."""
    sidecar = Path(heldout) if heldout else heldout_io.sidecar_path(path)
    flags = heldout_io.load(sidecar).train_corrupted if heldout or sidecar.exists() else None
    with StreamReader(path) as reader:
        inventory = Inventory(
            Path(path),
            reader.header,
            reader.spec,
            reader.tally(),
            heldout=sidecar if flags is not None else None,
            corrupted=Counter() if flags is not None else None,
        )
        for item in reader:
            inventory.tally.count(item)
            if isinstance(item, CorruptFrame):
                continue
            sample = decode(item.payload, reader.spec)
            if isinstance(sample, Rejected):
                inventory.rejected[sample.reason] += 1
                continue
            inventory.classes[sample.label] += 1
            inventory.tasks[sample.task] += 1
            noise = inventory.corrupted
            if noise is not None and flags is not None and _flagged(flags, sample.sample_id):
                noise[sample.label] += 1
    return inventory


def _flagged(flags: np.ndarray, sample_id: int) -> bool:
    return 0 <= sample_id < len(flags) and bool(flags[sample_id])


def _counts(counter: Counter[int]) -> str:
    if not counter:
        return "-"
    return " ".join(
        f"{'none' if key == NO_TASK else key}:{count}" for key, count in sorted(counter.items())
    )
