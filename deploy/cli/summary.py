"""The terminal's view of a finished run's report (`replay`, `serve`)."""

from __future__ import annotations

from typing import Any

import numpy as np


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A short human-readable summary for the terminal."""
    reasons = report.get("null_reasons", {})

    def metric(key: str, form: str) -> str:
        value = report[key]
        return f"n/a ({reasons.get(key, 'undefined')})" if value is None else format(value, form)

    lines = [
        f"final average accuracy  {metric('final_average_accuracy', '.4f')}",
        f"average forgetting      {metric('average_forgetting', '.4f')}",
        f"backward transfer       {metric('backward_transfer', '+.4f')}",
        f"prequential accuracy    {report['prequential_accuracy']:.4f}",
        f"samples seen/learned    {report['samples_seen']} / {report['samples_learned']}",
        f"rejected                {report['samples_rejected']} "
        f"{report['rejected_by_reason'] or ''}".rstrip(),
        f"quarantined now/ever    {report['samples_quarantined']} / "
        f"{report['samples_quarantined_total']} (re-admitted {report['samples_readmitted']}, "
        f"rejected as noisy {report['samples_rejected_noisy']})",
        f"throughput              {report['samples_per_second']:.0f} samples/s "
        f"({report['environment']['threads']} thread(s), {report['environment']['device']})",
    ]
    for reset in report.get("offset_resets", []):  # serve: a resume offset outside its log
        lines.append(
            f"offset reset            {reset['topic']}/{reset['partition']} {reset['reason']} "
            f"{reset['offset']} -> {reset['new_offset']} ({reset['policy']}; "
            f"skipped {reset['messages_skipped']}, gone {reset['messages_gone']})"
        )
    matrix = np.array(report["accuracy_matrix"], dtype=float)
    if matrix.size:
        lines.append("accuracy matrix (rows: evaluation points, columns: groups)")
        lines += ["  " + " ".join(f"{v:.3f}" for v in row) for row in matrix]
    return lines
