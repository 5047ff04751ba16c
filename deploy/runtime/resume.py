"""Where `serve` starts each partition: checkpoint, group commits and the log, reconciled aloud.

The checkpoint wins over the group's committed offsets (the model matches it), and a
disagreement is logged with both. Without a checkpoint, offsets the group committed
mean a model that has not seen what lies before them: that is `resume.without_checkpoint`,
logged as such, never "starting fresh". Offsets outside a partition's log go through
`resume.out_of_range` (ingest/offsets.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from streamcl.deploy.runtime.config import ResumeConfig
from streamcl.ingest.kafka import Offsets
from streamcl.ingest.offsets import Reset, TopicState, apply_policy

log = logging.getLogger(__name__)


def plan_resume(
    checkpoint: Offsets | None,
    state: TopicState,
    config: ResumeConfig,
    group_id: str,
    checkpoint_dir: Path,
) -> tuple[Offsets, list[Reset]]:
    """Offsets to seek each partition to (others: the group's commits), and the resets."""
    if checkpoint is None:
        offsets, origin = _without_checkpoint(state, config, group_id, checkpoint_dir)
    else:
        _compare(checkpoint, state.committed, group_id)
        offsets, origin = checkpoint, "from the checkpoint"
    offsets, resets = apply_policy(offsets, state, config.out_of_range, origin)
    for reset in resets:
        log.warning(
            "resume offset outside the log partition=%s/%d reason=%s offset=%d log_start=%d "
            "log_end=%d policy=%s new_offset=%d messages_skipped=%d messages_gone=%d",
            reset.topic,
            reset.partition,
            reset.reason,
            reset.offset,
            reset.log_start,
            reset.log_end,
            reset.policy,
            reset.new_offset,
            reset.messages_skipped,
            reset.messages_gone,
        )
    return offsets, resets


def _without_checkpoint(
    state: TopicState, config: ResumeConfig, group_id: str, checkpoint_dir: Path
) -> tuple[Offsets, str]:
    if not state.committed:
        log.info(
            "no checkpoint in %s and no offsets committed by group %s: a new model from the "
            "start of each partition",
            checkpoint_dir,
            group_id,
        )
        return {}, "committed by the group"
    committed = _render(state.committed)
    if config.without_checkpoint == "beginning":
        log.warning(
            "no checkpoint in %s but group %s committed %s: a new model from the start of "
            "each partition (resume.without_checkpoint=beginning)",
            checkpoint_dir,
            group_id,
            committed,
        )
        starts = {tp: bounds.start for tp, bounds in state.bounds.items()}
        return starts, "at the log start"
    unseen = sum(
        max(0, offset - state.bounds[tp].start)
        for tp, offset in state.committed.items()
        if tp in state.bounds
    )
    log.warning(
        "no checkpoint in %s but group %s committed %s: a new model starts there and has "
        "not seen the %d messages before them (resume.without_checkpoint=committed; "
        "'beginning' learns them)",
        checkpoint_dir,
        group_id,
        committed,
        unseen,
    )
    return dict(state.committed), "committed by the group"


def _compare(checkpoint: Offsets, committed: Offsets, group_id: str) -> None:
    """Log every partition where the group's commit is not the checkpoint's offset."""
    for tp in sorted(checkpoint.keys() & committed.keys()):
        ours, theirs = checkpoint[tp], committed[tp]
        if ours == theirs:
            continue
        # Behind: the process stopped between writing a checkpoint and committing it
        # (expected after a crash). Ahead: the checkpoint is older than the group's
        # progress (restored from a backup, another learner): messages are learned again.
        level = logging.INFO if theirs < ours else logging.WARNING
        log.log(
            level,
            "checkpoint and group disagree partition=%s/%d checkpoint_offset=%d "
            "committed_offset=%d group=%s using=checkpoint",
            tp[0],
            tp[1],
            ours,
            theirs,
            group_id,
        )


def _render(offsets: Offsets) -> str:
    return ",".join(f"{t}/{p}@{o}" for (t, p), o in sorted(offsets.items()))
