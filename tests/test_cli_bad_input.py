"""Bad input to the CLI fails early, in one line, with a non-zero exit (issue 9)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from streamcl.deploy.cli.main import cli
from streamcl.ingest import heldout as heldout_io
from streamcl.ingest.errors import ConfigError, DataError
from streamcl.ingest.recorded import StreamReader, StreamWriter
from streamcl.learner.checkpoint import CheckpointError, write_checkpoint
from tests.test_replay import write_damaged_stream

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real entry point in a subprocess: exit code and stderr as a user sees them."""
    return subprocess.run(
        [sys.executable, "-c", "from streamcl.deploy.cli.main import main; main()", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=120,
    )


def invoke(args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, args, env=env)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def cut_stream(source: Path, target: Path, keep_bytes: int) -> None:
    target.write_bytes(source.read_bytes()[:keep_bytes])


def frame_boundary(path: Path, after_frames: int) -> int:
    """Byte position of frame `after_frames` (0-based), found by its marker."""
    raw = path.read_bytes()
    position = raw.index(b"SCFR")  # the first frame (the header is JSON, without markers)
    for _ in range(after_frames):
        position = raw.index(b"SCFR", position + 1)
    return position


# --- 1. damaged and truncated streams -------------------------------------------------


def test_random_frames_after_a_valid_header_learn_nothing_and_exit_2(
    digits_stream: Path, tmp_path: Path
) -> None:
    with StreamReader(digits_stream) as reader:
        spec = reader.spec
    junk = tmp_path / "junk.scs"
    with StreamWriter(junk, spec, {"num_messages": 100}):
        pass
    with open(junk, "ab") as f:
        f.write(np.random.default_rng(0).bytes(20_000))
    message = one_line_error(run_cli(["replay", "--no-progress", "--stream", str(junk)]))
    assert f"nothing learned from {junk}: it holds no readable message" in message
    assert "1 damaged region(s), 20000 bytes skipped" in message
    assert "0 of the 100 frames its header announces read" in message


@pytest.mark.parametrize("cut", ["mid-frame", "frame-boundary"])
def test_truncated_stream_writes_its_report_then_fails(
    digits_stream: Path, tmp_path: Path, cut: str
) -> None:
    boundary = frame_boundary(digits_stream, 400)
    short = tmp_path / "short.scs"
    cut_stream(digits_stream, short, boundary + 30 if cut == "mid-frame" else boundary)
    report_path = tmp_path / "r.json"
    args = ["replay", "--no-progress", "--stream", str(short), "--report", str(report_path)]
    result = invoke(args)
    assert isinstance(result.exception, DataError), result.output
    message = str(result.exception)
    assert f"stream {short} is damaged" in message and "--allow-partial" in message
    assert "400 of the 1348 frames its header announces read" in message
    assert ("ends inside a damaged frame" in message) == (cut == "mid-frame")
    report = json.loads(report_path.read_text())
    assert report["samples_seen"] == 400
    assert report["stream_damage"]["frames_read"] == 400
    assert report["corrupt_frames"] == (1 if cut == "mid-frame" else 0)

    allowed = invoke([*args, "--allow-partial"])
    assert allowed.exit_code == 0, allowed.output
    assert "stream damage           " in allowed.output
    # Damaged regions are not messages: the rejected line counts only rejected messages.
    rejected = next(line for line in allowed.output.splitlines() if line.startswith("rejected"))
    assert rejected.split() == ["rejected", "0"]


# --- 2. malformed learner and spec settings fail at start-up --------------------------


def test_record_with_a_malformed_feature_shape_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "r.scs"
    args = ["record", "--topic", "t", "--out", str(out), "--max-messages", "1"]
    message = one_line_error(run_cli([*args, "--feature-shape", "abc"]))
    assert "feature_shape.0: Input should be a valid integer" in message
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--model", "os:getcwd"], "model factory 'os:getcwd' failed when called with"),
        (["--model", "getcwd"], "model must be mlp, cnn or 'package.module:function'"),
        (["--hidden", "0"], "hidden.0: Input should be greater than or equal to 1"),
    ],
)
def test_replay_rejects_a_model_it_cannot_build(
    digits_stream: Path, tmp_path: Path, flags: list[str], expected: str
) -> None:
    report = tmp_path / "r.json"
    result = invoke(["replay", "--stream", str(digits_stream), "--report", str(report), *flags])
    assert isinstance(result.exception, ConfigError), result.output
    assert expected in str(result.exception) and "\n" not in str(result.exception)
    assert not report.exists()


def test_serve_config_rejects_a_zero_width_model_before_connecting(tmp_path: Path) -> None:
    config = tmp_path / "service.yaml"
    config.write_text("learner:\n  hidden: [0]\nspec:\n  feature_shape: [8, 0]\n")
    message = one_line_error(run_cli(["serve", "--config", str(config)]))
    assert "learner.hidden.0: Input should be greater than or equal to 1" in message
    assert "feature_shape must be positive dims" in message


# --- 3. output paths are checked before the run ----------------------------------------


@pytest.mark.parametrize(
    ("flag", "path", "expected"),
    [
        ("--report", "/proc/nope/r.json", "cannot write the report to /proc/nope/r.json"),
        ("--plots", "/dev/null/x", "cannot write the plots to /dev/null/x"),
        ("--metrics-out", "/dev/null/m.prom", "cannot write the metrics to /dev/null/m.prom"),
    ],
)
def test_replay_checks_its_output_paths_before_learning(
    digits_stream: Path, flag: str, path: str, expected: str
) -> None:
    result = invoke(["replay", "--no-progress", "--stream", str(digits_stream), flag, path])
    assert isinstance(result.exception, ConfigError), result.output
    assert expected in str(result.exception)
    assert "final average accuracy" not in result.output  # failed before the run


def test_serve_checks_its_report_path_before_connecting(tmp_path: Path) -> None:
    # Port 9 (discard) on loopback: nothing listens, so a late check would fail on Kafka.
    args = ["serve", "--bootstrap-servers", "127.0.0.1:9", "--report", "/proc/nope/r.json"]
    message = one_line_error(run_cli([*args, "--checkpoint-dir", str(tmp_path / "c")]))
    assert "cannot write the report to /proc/nope/r.json: No such file or directory" in message


@pytest.mark.parametrize(
    "args",
    [
        ["stream", "make", "--dataset", "digits"],
        ["stream", "import", "in.npz"],
        ["record", "--topic", "t", "--max-messages", "1"],
    ],
)
def test_stream_writers_check_out_before_reading_anything(args: list[str]) -> None:
    result = invoke([*args, "--out", "/dev/null/s.scs"])
    assert isinstance(result.exception, ConfigError), result.output
    assert "cannot write the stream to /dev/null/s.scs: File exists (/dev/null)" in str(
        result.exception
    )


def test_a_checked_output_path_leaves_no_file(digits_stream: Path, tmp_path: Path) -> None:
    report = tmp_path / "deep" / "r.json"
    result = invoke(
        ["replay", "--stream", str(digits_stream), "--report", str(report), "--model", "x:y"]
    )
    assert isinstance(result.exception, ConfigError)
    assert report.parent.is_dir() and not report.exists()


# --- 4. --resume of something that is not a replay checkpoint --------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"hello, not a checkpoint\n", "torch cannot read it"),
        (b"", "it is empty, truncated or damaged"),
        (pickle.dumps({"x": 1}), "it holds more than tensors and plain containers"),
    ],
)
def test_resume_of_a_file_that_is_not_a_checkpoint_says_so(
    digits_stream: Path, tmp_path: Path, content: bytes, expected: str
) -> None:
    bogus = tmp_path / "run.pt"
    bogus.write_bytes(content)
    result = invoke(["replay", "--stream", str(digits_stream), "--resume", str(bogus)])
    assert isinstance(result.exception, CheckpointError), result.output
    assert str(result.exception).startswith(f"{bogus} is not a streamcl checkpoint: {expected}")


def test_resume_of_a_pickle_is_one_line_without_torchs_advice(
    digits_stream: Path, tmp_path: Path
) -> None:
    """torch's own text advises weights_only=False: arbitrary code execution."""
    bogus = tmp_path / "run.pt"
    bogus.write_bytes(pickle.dumps({"x": 1}))
    proc = run_cli(["replay", "--stream", str(digits_stream), "--resume", str(bogus)])
    assert f"{bogus} is not a streamcl checkpoint" in one_line_error(proc)
    assert "weights_only" not in proc.stderr and "Warning" not in proc.stderr


def test_resume_of_a_plain_torch_file_or_a_service_checkpoint(
    digits_stream: Path, tmp_path: Path
) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"model": torch.zeros(3)}, plain)
    service = tmp_path / "service.pt"
    write_checkpoint(service, {"offsets": [], "learner": {}})
    for path, expected in [
        (plain, "is not a streamcl checkpoint (streamcl-checkpoint/1)"),
        (service, "is a streamcl checkpoint, but not one of a replay"),
    ]:
        result = invoke(["replay", "--stream", str(digits_stream), "--resume", str(path)])
        assert isinstance(result.exception, CheckpointError), result.output
        assert expected in str(result.exception)


# --- 5. one naming rule for environment variables ----------------------------------------


def test_serve_reads_its_config_file_from_streamcl_serve_config(tmp_path: Path) -> None:
    config = tmp_path / "service.yaml"
    config.write_text("kafka:\n  bootstrap_serverz: 127.0.0.1:9\n")
    # A short timeout: if the variable were ignored, serve would fail on Kafka quickly.
    env = {"STREAMCL_SERVE_CONFIG": str(config), "STREAMCL_SERVE_CONNECT_TIMEOUT": "1"}
    result = invoke(["serve"], env=env)
    assert isinstance(result.exception, ConfigError), result.output
    assert "bootstrap_serverz" in str(result.exception)

    old = invoke(["serve"], env={"STREAMCL_SERVE_CONFIG_FILE": str(config), **env})
    assert "STREAMCL_SERVE_CONFIG_FILE is deprecated: use STREAMCL_SERVE_CONFIG" in old.output
    del env["STREAMCL_SERVE_CONFIG"]
    old = invoke(["serve"], env={"STREAMCL_SERVE_CONFIG_FILE": str(config), **env})
    assert isinstance(old.exception, ConfigError), old.output  # the old name still works
    assert "bootstrap_serverz" in str(old.exception)


def test_every_variable_is_named_after_its_flag() -> None:
    replay_help = invoke(["replay", "--help"]).output
    assert "STREAMCL_REPLAY_TASK_IDS" in replay_help and "USE_TASK_IDS" not in replay_help
    serve_help = invoke(["serve", "--help"]).output
    assert "STREAMCL_SERVE_CONFIG]" in serve_help and "CONFIG_FILE" not in serve_help


def test_unknown_streamcl_variables_are_warned_about_with_the_closest_name() -> None:
    env = {"STREAMCL_REPLAY_MEMROY": "3", "STREAMCL_REQUIRE_DATA": "1", "STREAMCL_DATA": "/x"}
    result = invoke(["stream", "make", "--help"], env=env)
    assert result.exit_code == 0
    warnings = [line for line in result.output.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, result.output
    assert (
        "unknown environment variable STREAMCL_REPLAY_MEMROY ignored "
        "(did you mean STREAMCL_REPLAY_MEMORY?)" in warnings[0]
    )


# --- 6. a data directory the user named must hold the data -------------------------------


def test_stream_make_with_an_empty_data_dir_or_a_missing_streamcl_data(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "s.scs"
    args = ["stream", "make", "--tasks", "5", "--samples-per-task", "10", "--out", str(out)]
    result = invoke([*args, "--data-dir", str(empty)])
    assert isinstance(result.exception, DataError), result.output
    assert f"--data-dir {empty} lacks train-images-idx3-ubyte" in str(result.exception)
    result = invoke(args, env={"STREAMCL_DATA": str(tmp_path / "nowhere")})
    assert isinstance(result.exception, DataError), result.output
    assert f"$STREAMCL_DATA {tmp_path / 'nowhere'} does not exist" in str(result.exception)
    assert not out.exists()


# --- 7. config errors say where a key belongs, and name the file -------------------------


def test_serve_given_a_flat_replay_style_config_says_where_keys_belong(tmp_path: Path) -> None:
    config = tmp_path / "flat.yaml"
    config.write_text("strategy: er\nlearner:\n  memroy: 10\nbootstrap_servers: h:1\n")
    result = invoke(["serve", "--config", str(config)])
    assert isinstance(result.exception, ConfigError), result.output
    message = str(result.exception)
    assert message.startswith(f"invalid settings in {config}: ")
    assert "strategy: not a setting here; it belongs under learner: (learner.strategy)" in message
    assert "bootstrap_servers: not a setting here; it belongs under kafka:" in message
    assert "learner.memroy: unknown setting (did you mean memory?)" in message
    assert "Extra inputs are not permitted" not in message


def test_serve_config_of_a_wrong_type_names_the_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "service.yaml"
    config.write_text("learner:\n  ewc:\n    lambda: lots\n")
    result = invoke(["serve", "--config", str(config)])
    assert isinstance(result.exception, ConfigError), result.output
    assert f"invalid settings in {config}: learner.ewc.lambda: Input should be a valid number" in (
        str(result.exception)
    )


def test_replay_config_errors_name_the_file_and_key_not_the_flag(
    digits_stream: Path, tmp_path: Path
) -> None:
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text(f"stream: {digits_stream}\nmemory: abc\n")
    result = invoke(["replay", "--config", str(wrong_type)])
    assert result.exit_code == 2
    assert f"{wrong_type}: memory: 'abc' is not a valid integer range" in result.output
    assert "'--memory'" not in result.output

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(f"stream: {digits_stream}\nmemroy: 10\nlearner:\n  lr: 0.1\n")
    result = invoke(["replay", "--config", str(unknown)])
    assert result.exit_code == 2
    assert "memroy (did you mean memory?)" in result.output
    assert "learner (this command takes the learner's settings at the top level)" in result.output


# --- 8. --version and `stream inspect` ---------------------------------------------------


def test_version() -> None:
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"streamcl, version {importlib.metadata.version('streamcl')}"


def test_stream_inspect_counts_classes_tasks_and_label_noise(tmp_path: Path) -> None:
    out = tmp_path / "noisy.scs"
    made = invoke(["stream", "make", "--dataset", "digits", "--noise", "0.3", "--out", str(out)])
    assert made.exit_code == 0, made.output
    result = invoke(["stream", "inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    truth = heldout_io.load(heldout_io.sidecar_path(out)).train_corrupted
    assert info["corrupted_labels"] == int(truth.sum()) > 0
    assert sum(info["per_class"].values()) == info["messages_valid"] == 1348
    assert sum(info["per_task"].values()) == 1348 and len(info["per_task"]) == 5
    assert info["header"]["noise"] == 0.3 and info["spec"]["feature_shape"] == [8, 8]
    assert info["stream_damage"]["problem"] is None


def test_stream_inspect_lists_invalid_messages_and_damaged_regions(
    digits_stream: Path, tmp_path: Path
) -> None:
    damaged = tmp_path / "damaged.scs"
    expected = write_damaged_stream(digits_stream, damaged)
    result = invoke(["stream", "inspect", str(damaged)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"rejected      {sum(expected.values())} {dict(sorted(expected.items()))}" in lines
    assert "label noise   unknown (no held-out sidecar with ground truth)" in lines
    damage = [line for line in lines if line.startswith("  byte ")]
    assert len(damage) == 3 and all(line.endswith("checksum mismatch") for line in damage)
    assert any(line.startswith("damage        3 damaged region(s)") for line in lines)
