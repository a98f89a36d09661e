"""Metric files: JSONL lines, TensorBoard events readable back, the stdout line, and one-step-late fetch."""

import json
import os
import struct

import jax.numpy as jnp

from attnrl_jax.metrics import LaggedMetrics, MetricWriter


def _read_events(directory):
    """Scalars from TensorBoard event files (TFRecord framing around Event protos)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for name in os.listdir(directory):
        data = open(os.path.join(directory, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, round(v.simple_value, 6)))
    return out


def test_writer_outputs(tmp_path, capsys):
    writer = MetricWriter(str(tmp_path))
    writer.write(1, {"loss": jnp.float32(0.5), "accuracy": 0.25, "note": "text is skipped"})
    writer.write(2, {"loss": 0.25, "accuracy": 0.5, "grad_norm": float("nan")})
    writer.close()
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert lines[0] == {"step": 1, "loss": 0.5, "accuracy": 0.25, "note": None}
    assert lines[1]["step"] == 2 and lines[1]["accuracy"] == 0.5
    events = _read_events(tmp_path / "tb")
    assert events["loss"] == [(1, 0.5), (2, 0.25)] and "grad_norm" not in events  # non-finite skipped
    out = capsys.readouterr().out
    assert "step 1: accuracy=0.25 loss=0.5" in out


def test_metrics_are_fetched_one_step_late():
    lag = LaggedMetrics()
    assert lag.push(1, {"loss": jnp.float32(1.0)}) is None
    step, got = lag.push(2, {"loss": jnp.float32(2.0)})
    assert step == 1 and float(got["loss"]) == 1.0
    assert lag.flush()[0] == 2 and lag.flush() is None


def test_a_resumed_run_writes_each_step_once(tmp_path):
    """A run that wrote steps 1-4 (plus a torn line) and resumes from its step-2 checkpoint ends with steps
    1, 2, 3 once each in metrics.jsonl and in the TensorBoard events, the rewritten values winning."""
    writer = MetricWriter(str(tmp_path), stdout=False)
    for step in range(1, 5):
        writer.write(step, {"loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # killed mid-line
    writer = MetricWriter(str(tmp_path), stdout=False, resume_step=2)
    writer.write(3, {"loss": 30.0})
    writer.close()
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert sorted(_read_events(tmp_path / "tb")["loss"]) == [(1, 1.0), (2, 2.0), (3, 30.0)]
    MetricWriter(str(tmp_path), stdout=False).close()  # a fresh start (no checkpoint) keeps nothing
    assert open(tmp_path / "metrics.jsonl").read() == ""
    assert _read_events(tmp_path / "tb") == {}
