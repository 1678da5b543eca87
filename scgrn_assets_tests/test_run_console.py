"""What a person sees while assets run: step lines with durations, progress at a steady pace, wall times."""

from __future__ import annotations

import io

import dagster as dg
import pytest

from scgrn_assets.run_console import (LOG_EVERY_SECONDS, RunConsoleHandler, asset_progress, console_logger,
                                      progress_message, step_wall_times)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_with_console(asset_fn, stream, is_terminal, instance):
    @dg.logger
    def captured(_init_context):
        import logging

        logger = logging.Logger("test_console", level=logging.DEBUG)
        logger.addHandler(RunConsoleHandler(stream, is_terminal=is_terminal))
        return logger

    defs = dg.Definitions(jobs=[dg.define_asset_job("job", selection=[asset_fn])], assets=[asset_fn])
    job = defs.resolve_job_def("job").with_logger_defs({"console": captured})
    return job.execute_in_process(run_config={"loggers": {"console": {}}}, instance=instance)


def test_a_log_gets_step_lines_and_one_progress_line_per_ten_seconds():
    clock = FakeClock()

    @dg.asset
    def trained_thing(context):
        progress = asset_progress(context, "training", "steps", clock=clock)
        for step in range(1, 101):
            clock.now += 0.5  # 50 s of work in all: lines at 0.5 s (first), ~10.5, ~20.5, ~30.5, ~40.5, and the end
            progress(step, 100, loss=1.0 / step)
        return 1

    stream = io.StringIO()
    with dg.instance_for_test() as instance:
        result = run_with_console(trained_thing, stream, False, instance)
        assert result.success
        times = step_wall_times(instance, result.run_id)
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("started  trained_thing") and "finished trained_thing in " in lines[-1]
    progress_lines = [line for line in lines if "trained_thing: " in line]
    assert len(progress_lines) == 6, lines
    assert "100/100 steps (100%)" in progress_lines[-1] and "loss 0.010" in progress_lines[-1]
    assert "ETA" in progress_lines[1] and "2.0 steps/s" in progress_lines[1]
    assert [(step, succeeded) for step, _partition, _seconds, succeeded in times] == [("trained_thing", True)]
    assert times[0][2] >= 0


def test_a_terminal_gets_a_bar_redrawn_in_place_not_a_line_per_update():
    clock = FakeClock()

    @dg.asset
    def counted(context):
        progress = asset_progress(context, "moments", "cells", clock=clock)
        for done in range(0, 1001, 50):
            clock.now += 1.0
            progress(done, 1000)
        return 1

    stream = io.StringIO()
    with dg.instance_for_test() as instance:
        assert run_with_console(counted, stream, True, instance).success
    text = stream.getvalue()
    assert text.count("\r\033[K") >= 10 and "[########################] moments: 1000/1000 cells" in text
    assert len([line for line in text.split("\n") if line.strip()]) == 2  # the bar never adds a line


def test_a_failing_display_never_fails_the_run():
    class Broken(io.StringIO):
        def write(self, text):
            raise OSError("terminal went away")

    @dg.asset
    def answer(context):
        asset_progress(context, "work", "items")(1, 1)
        return 42

    with dg.instance_for_test() as instance:
        assert run_with_console(answer, Broken(), False, instance).success


def test_progress_message_says_rate_and_eta_and_handles_an_unknown_total():
    assert progress_message("MI", 25, 100, "edges", 5.0, {"q": 0.5}) == \
        "MI: 25/100 edges (25%), q 0.500, 5.0 edges/s, ETA 15.0 s"
    assert progress_message("files", 3, 0, "files", 0.0, {}) == "files: 3 files"
    assert LOG_EVERY_SECONDS == pytest.approx(10.0)


def test_the_cli_console_logger_is_a_dagster_logger():
    assert isinstance(console_logger, dg.LoggerDefinition)
