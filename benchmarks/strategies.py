"""Strategies against forgetting on Fashion-MNIST, measured with `streamcl replay`.

    python benchmarks/strategies.py [--plots DIR] [--samples-per-task N]

Writes benchmarks/results/strategies.json. Every run is the `streamcl replay` command
recorded beside its figures (single pass, batch 10, MLP 256x2, SGD lr 0.1, 1 thread):

1. permuted Fashion-MNIST, 5 tasks (domain-incremental): naive vs online EWC;
2. Split Fashion-MNIST, 5 x 2 classes, task ids at train and test time: PackNet;
3. the permuted stream with task ids hidden from the learner: EWC driven by ADWIN and
   by Page-Hinkley, events matched to the true changes (within 1,000 samples);
4. ER + EWC uninterrupted vs stopped half-way, checkpointed and resumed in a fresh
   process: the reports must be equal (timings aside).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamcl.deploy.runtime.session import without_timings
from streamcl.ingest.codec import decode
from streamcl.ingest.recorded import Frame, StreamReader
from streamcl.ingest.schema import Sample

RESULTS = Path(__file__).parent / "results" / "strategies.json"
STREAM_COMMANDS = [
    "streamcl stream make --dataset fashion-mnist --scenario permuted --tasks 5 --out permuted.scs",
    "streamcl stream make --dataset fashion-mnist --scenario class-incremental --tasks 5 "
    "--out split.scs",
]
RESUME_COMMANDS = [
    "streamcl replay --stream permuted.scs --strategy er+ewc --stop-after N --checkpoint er-ewc.pt",
    "streamcl replay --stream permuted.scs --strategy er+ewc --resume er-ewc.pt --report R.json",
]
DETECTION_WINDOW = 1000
STREAMCL = [sys.executable, "-m", "streamcl.deploy.cli"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plots", type=Path, help="also write each run's PNG plots here")
    parser.add_argument("--samples-per-task", type=int, help="permuted stream size per task")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        permuted, split = work / "permuted.scs", work / "split.scs"
        sizes = ["--samples-per-task", str(args.samples_per_task)] if args.samples_per_task else []
        make(["--scenario", "permuted", "--tasks", "5", *sizes, "--out", str(permuted)])
        make(["--scenario", "class-incremental", "--tasks", "5", "--out", str(split)])
        changes = task_changes(permuted)
        runs: dict[str, dict[str, Any]] = {}

        def run(name: str, stream: Path, *flags: str) -> dict[str, Any]:
            runs[name] = replay(name, stream, work, args.plots, list(flags))
            return runs[name]["report"]

        naive = run("permuted/naive", permuted, "--strategy", "naive")
        ewc = run("permuted/ewc", permuted, "--strategy", "ewc")
        packnet = run("split/packnet", split, "--strategy", "packnet")
        run("split/naive", split, "--strategy", "naive")
        hidden = ["--strategy", "ewc", "--no-task-ids"]
        adwin = run("permuted-no-task-ids/ewc+adwin", permuted, *hidden, "--detector", "kind=adwin")
        ph = run(
            "permuted-no-task-ids/ewc+page-hinkley",
            permuted,
            *hidden,
            "--detector",
            "kind=page-hinkley",
        )
        straight = run("permuted/er+ewc", permuted, "--strategy", "er+ewc")
        # Mid-task and mid-batch: the pending partial batch travels in the checkpoint.
        resumed = stop_and_resume(permuted, work, changes[len(changes) // 2] + 4321)

    summary = {
        "1_permuted_ewc_vs_naive": {
            "naive": figures(naive),
            "ewc": figures(ewc),
            "forgetting_ratio": ewc["average_forgetting"] / naive["average_forgetting"],
            "holds": ewc["average_forgetting"] <= naive["average_forgetting"] / 2
            and ewc["final_average_accuracy"] > naive["final_average_accuracy"],
        },
        "2_split_packnet_task_incremental": {
            **figures(packnet),
            "scenario": packnet["scenario"],
            "holds": packnet["average_forgetting"] <= 0.01
            and packnet["final_average_accuracy"] >= 0.93,
        },
        "3_detected_boundaries": {
            "true_changes": changes,
            "ewc_true_boundaries": figures(ewc),
            **{
                name: {**figures(report), **detection(report["drift_events"], changes)}
                for name, report in (("adwin", adwin), ("page_hinkley", ph))
            },
        },
        "4_er_ewc_resume": {
            **figures(straight),
            "stopped_after": resumed["stopped_after"],
            "resumed_report_equals_uninterrupted": without_timings(resumed["report"])
            == without_timings(straight),
        },
    }
    for name in ("adwin", "page_hinkley"):
        entry = summary["3_detected_boundaries"][name]
        entry["within_3_points_of_true_boundaries"] = (
            abs(entry["final_average_accuracy"] - ewc["final_average_accuracy"]) <= 0.03
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "Fashion-MNIST, single pass, batch 10, MLP 256x2, SGD lr 0.1, seed 0",
                "command": "python benchmarks/strategies.py"
                + (f" --samples-per-task {args.samples_per_task}" if args.samples_per_task else ""),
                "torch": torch.__version__,
                "streams": STREAM_COMMANDS,
                "resume_commands": RESUME_COMMANDS,
                "summary": summary,
                "runs": {
                    name: {"command": entry["command"], **figures(entry["report"])}
                    for name, entry in runs.items()
                },
            },
            indent=2,
        )
        + "\n"
    )
    print(json.dumps(summary, indent=2))
    print(f"wrote {RESULTS}")


def make(flags: list[str]) -> None:
    subprocess.run([*STREAMCL, "stream", "make", "--dataset", "fashion-mnist", *flags], check=True)


def replay(
    name: str, stream: Path, work: Path, plots: Path | None, flags: list[str]
) -> dict[str, Any]:
    """Run `streamcl replay` in its own process; returns its command and report."""
    report = work / (name.replace("/", "_") + ".json")
    command = ["replay", "--stream", str(stream), "--no-progress", *flags]
    extra = ["--report", str(report)]
    if plots is not None:
        extra += ["--plots", str(plots / name)]
    subprocess.run([*STREAMCL, *command, *extra], check=True, stdout=subprocess.DEVNULL)
    result = json.loads(report.read_text())
    print(json.dumps({"run": name, **figures(result)}), flush=True)
    return {
        "command": "streamcl " + " ".join(command).replace(str(stream), stream.name),
        "report": result,
    }


def stop_and_resume(stream: Path, work: Path, stop_after: int) -> dict[str, Any]:
    """ER + EWC stopped after `stop_after` messages, resumed in a fresh process."""
    checkpoint = work / "er-ewc.pt"
    base = ["replay", "--stream", str(stream), "--no-progress", "--strategy", "er+ewc"]
    subprocess.run(
        [*STREAMCL, *base, "--stop-after", str(stop_after), "--checkpoint", str(checkpoint)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    report = work / "er-ewc-resumed.json"
    subprocess.run(
        [*STREAMCL, *base, "--resume", str(checkpoint), "--report", str(report)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return {"stopped_after": stop_after, "report": json.loads(report.read_text())}


def task_changes(stream: Path) -> list[int]:
    """Stream indices where the task id changes (the ground truth for detectors)."""
    tasks = []
    with StreamReader(stream) as reader:
        for frame in reader:
            if isinstance(frame, Frame):
                sample = decode(frame.payload, reader.spec)
                if isinstance(sample, Sample):
                    tasks.append(sample.task)
    return (np.flatnonzero(np.diff(tasks)) + 1).tolist()


def detection(events: list[int], changes: list[int]) -> dict[str, Any]:
    """Match each change to the first event within DETECTION_WINDOW samples after it."""
    delays, matched = [], set()
    for change in changes:
        hits = [e for e in events if change <= e < change + DETECTION_WINDOW and e not in matched]
        if hits:
            matched.add(hits[0])
            delays.append(hits[0] - change)
    return {
        "events": events,
        "found": len(delays),
        "delays": delays,
        "false_alarms": len([e for e in events if e not in matched]),
        "holds": len(delays) == len(changes) and len([e for e in events if e not in matched]) <= 2,
    }


def figures(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "final_average_accuracy": round(report["final_average_accuracy"], 4),
        "average_forgetting": round(report["average_forgetting"], 4),
        "backward_transfer": round(report["backward_transfer"], 4),
        "prequential_accuracy": round(report["prequential_accuracy"], 4),
        "task_boundaries_by_reason": report["task_boundaries_by_reason"],
        "drift_event_count": report["drift_event_count"],
        "samples_per_second": round(report["samples_per_second"], 1),
    }


if __name__ == "__main__":
    main()
