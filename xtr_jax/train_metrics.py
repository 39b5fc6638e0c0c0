"""Training metrics: TensorBoard event files and a console progress line, written by process 0 only.

Uses TensorBoard's own protobuf writer (`tensorboard.summary.writer`), so no TensorFlow import is needed in the
training process.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricsWriter:
  """Writes scalars / text to `logdir` (TensorBoard) and prints a progress line; a no-op when not `active`."""

  def __init__(self, logdir: str, *, active: bool = True, stream=None):
    self.active = active
    self.logdir = logdir
    self._stream = stream or sys.stdout
    self._writer = EventFileWriter(logdir, flush_secs=30) if active else None

  def _add(self, summary, step: int) -> None:
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if not self.active:
      return
    for tag, value in values.items():
      self._add(scalar_summary.scalar_pb(tag, np.float32(value)), step)

  def text(self, step: int, tag: str, text: str) -> None:
    if not self.active:
      return
    # TensorBoard renders markdown; a code block keeps gin's layout.
    self._add(text_summary.text_pb(tag, "```\n" + text + "\n```"), step)

  def progress(self, step: int, total_steps: int, values: Mapping[str, float]) -> None:
    if not self.active:
      return
    shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
    print(f"[train] step {step}/{total_steps} {shown}", file=self._stream, flush=True)

  def flush(self) -> None:
    if self.active:
      self._writer.flush()

  def close(self) -> None:
    if self.active:
      self._writer.close()


def _fmt(v: float) -> str:
  v = float(v)
  if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
    return f"{v:.3e}"
  return f"{v:.4f}"


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of every event file in `logdir` (for tests and notebooks)."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  out: dict[str, list[tuple[int, float]]] = {}
  for name in sorted(os.listdir(logdir)):
    if "tfevents" not in name:
      continue
    acc = event_accumulator.EventAccumulator(os.path.join(logdir, name), size_guidance={"tensors": 0})
    acc.Reload()
    for tag in acc.Tags()["tensors"]:
      for ev in acc.Tensors(tag):
        arr = np.frombuffer(ev.tensor_proto.tensor_content, np.float32) if ev.tensor_proto.tensor_content \
            else np.asarray(ev.tensor_proto.float_val, np.float32)
        if arr.size == 1:
          out.setdefault(tag, []).append((ev.step, float(arr[0])))
  return out
