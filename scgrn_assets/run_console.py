"""What a person sees while assets run: one line per asset start and end, progress of long steps, wall times.

Two halves, joined by Dagster's own logging:

* :func:`asset_progress` turns a library step's ``progress(done, total, **detail)`` calls into Dagster log
  lines (every ~10 s at INFO, so the UI and a log file get a steady heartbeat; every ~0.5 s at DEBUG, for a
  terminal's bar), each carrying the numbers under :data:`PROGRESS_FIELD`.
* :func:`console_logger` is the run's console logger (it replaces Dagster's default one for the CLI's runs):
  a line for each step's start and end with its duration, and progress as a bar on a terminal or as a line
  every ~10 s in a log. It ignores everything else (warnings and failures are printed once by the CLI).

:func:`step_wall_times` reads back, from the instance's event log, how long each step of a run took: the
summary the CLI prints at the end.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass

import dagster as dg

PROGRESS_FIELD = "scgrn_progress"
"""Name of the ``extra`` field a progress log record carries (``done``, ``total``, ``unit``, details)."""

LOG_EVERY_SECONDS = 10.0
"""A progress line this often in the UI and in a log."""
BAR_EVERY_SECONDS = 0.5


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _detail_text(detail: dict) -> str:
    parts = []
    for name, value in detail.items():
        if isinstance(value, float):
            if not math.isfinite(value):
                continue
            value = f"{value:.3f}"
        parts.append(f"{name.replace('_', ' ')} {value}")
    return ", ".join(parts)


def progress_message(what: str, done: int, total: int, unit: str, rate: float, detail: dict) -> str:
    """``what: done/total unit (pct), detail, rate unit/s, ETA``: one progress line."""
    if total:
        text = f"{what}: {done}/{total} {unit} ({100 * done / total:.0f}%)"
    else:  # the total is not known up front
        text = f"{what}: {done} {unit}"
    extra = _detail_text(detail)
    if extra:
        text += f", {extra}"
    if rate > 0:
        text += f", {rate:.1f} {unit}/s"
        if total and done < total:
            text += f", ETA {_duration((total - done) / rate)}"
    return text


def asset_progress(context, what: str, unit: str = "items", *, clock=time.monotonic):
    """A :class:`scgrn_assets.lib.progress.Progress` for a step inside an asset: Dagster log lines, throttled.

    ``what`` names the work (``"training"``, ``"GSE900001 attention"``); ``unit`` what ``done`` counts.
    The last call (``done == total``) is always logged.
    """
    started = clock()
    last = {"info": -math.inf, "debug": -math.inf}

    def progress(done: int, total: int, /, **detail: object) -> None:
        now = clock()
        finished = bool(total) and done >= total
        level = None
        if finished or now - last["info"] >= LOG_EVERY_SECONDS:
            level = "info"
        elif now - last["debug"] >= BAR_EVERY_SECONDS:
            level = "debug"
        if level is None:
            return
        last[level] = last["debug"] = now
        elapsed = now - started
        rate = done / elapsed if elapsed > 0 else 0.0
        fields = {"what": what, "done": int(done), "total": int(total), "unit": unit, "rate": rate,
                  "detail": {k: v for k, v in detail.items() if isinstance(v, (int, float, str))}}
        message = progress_message(what, done, total, unit, rate, fields["detail"])
        getattr(context.log, level)(message, extra={PROGRESS_FIELD: fields})

    return progress


@dataclass
class _Bar:
    width: int = 24

    def render(self, fields: dict) -> str:
        done, total = fields["done"], fields["total"]
        filled = int(self.width * done / total) if total else 0
        bar = "#" * filled + "." * (self.width - filled)
        return f"[{bar}] " + progress_message(fields["what"], done, total, fields["unit"], fields["rate"],
                                              fields["detail"])


class RunConsoleHandler(logging.Handler):
    """Step start/end lines and progress for one run, written to ``stream``.

    On a terminal progress is one line redrawn in place (a bar); elsewhere (a log file, CI) a progress
    line is written at most every :data:`LOG_EVERY_SECONDS` per step.
    """

    def __init__(self, stream=None, is_terminal: bool | None = None):
        super().__init__(level=logging.DEBUG)
        self.stream = stream if stream is not None else sys.stderr
        self.is_terminal = self.stream.isatty() if is_terminal is None else is_terminal
        self._started: dict[str, float] = {}
        self._bar_shown = False
        self._bar = _Bar()

    def _write_line(self, text: str) -> None:
        if self._bar_shown:
            self.stream.write("\r\033[K")
            self._bar_shown = False
        self.stream.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self.stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            meta = getattr(record, "dagster_meta", None) or {}
            event = meta.get("dagster_event")
            step = meta.get("step_key") or "run"
            partition = (meta.get("job_tags") or {}).get("dagster/partition")
            label = f"{step} [{partition}]" if partition else step
            progress = getattr(record, PROGRESS_FIELD, None)
            if event is not None:
                self._on_event(event, label)
            elif progress is not None:
                if self.is_terminal:
                    if self._bar_shown:
                        self.stream.write("\r\033[K")
                    self.stream.write(self._bar.render(progress)[:200])
                    self.stream.flush()
                    self._bar_shown = True
                elif record.levelno >= logging.INFO:
                    self._write_line(f"  {label}: " + progress_message(
                        progress["what"], progress["done"], progress["total"], progress["unit"],
                        progress["rate"], progress["detail"]).split(": ", 1)[-1])
        except Exception:  # noqa: BLE001 - a display must never take a run down
            self.handleError(record)

    def _on_event(self, event, label: str) -> None:
        kind = event.event_type_value
        if kind == "STEP_START":
            self._started[label] = time.monotonic()
            self._write_line(f"started  {label}")
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE"):
            seconds = time.monotonic() - self._started.pop(label, math.nan)
            verb = "finished" if kind == "STEP_SUCCESS" else "FAILED  "
            self._write_line(f"{verb} {label} in {_duration(seconds)}")


@dg.logger(description="Step start/end lines with durations and progress bars (the scgrn CLI's console).")
def console_logger(init_context) -> logging.Logger:
    logger = logging.Logger("scgrn_console", level=logging.DEBUG)
    logger.addHandler(RunConsoleHandler())
    return logger


def step_wall_times(instance, run_id: str) -> list[tuple[str, str | None, float, bool]]:
    """``(step key, partition, seconds, succeeded)`` for each step the run started, from its event log."""
    records = instance.get_records_for_run(run_id, of_type={
        dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE}).records
    partition = None
    run = instance.get_run_by_id(run_id)
    if run is not None:
        partition = run.tags.get("dagster/partition")
    started: dict[str, float] = {}
    times = []
    for record in records:
        entry = record.event_log_entry
        kind = entry.dagster_event.event_type_value
        if kind == "STEP_START":
            started[entry.step_key] = entry.timestamp
        elif entry.step_key in started:
            times.append((entry.step_key, partition, entry.timestamp - started.pop(entry.step_key),
                          kind == "STEP_SUCCESS"))
    return times
