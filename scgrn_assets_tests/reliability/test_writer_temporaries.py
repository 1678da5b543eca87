"""Every writer's temporaries are under the storage orphan cleanup: kill -9 one mid-write, rerun.

Each writer of :data:`writers.WRITERS` (EdgeMoments.save_npz, TokenizedCells.save_npz, Parquet,
pickles, save_geneformer) rewrites its artefact in a subprocess that is
SIGKILLed while a temporary of it exists. Then: what is under the final name, if anything,
is the whole artefact; what the killed process left is named
``.tmp-<final name>-<host>-<pid>-<id>`` (the pattern :func:`storage.remove_orphaned_temporaries`
knows); and the next write leaves the folder holding the artefact alone, equal to an
uninterrupted write. Found this way: tar extraction (since removed) staged in ``tempfile.mkdtemp``
folders (``.GSE1.extracting-*``) that nothing ever removed after a kill.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scgrn_assets_tests.reliability import ledger, scenarios, writers

ROOT = Path(__file__).resolve().parents[2]
SEED = 20261207


def _temporaries(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.name.startswith(".tmp-"))


def _start_writer(name: str, out: Path, inputs: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "scgrn_assets_tests.reliability.writers", name, str(out),
                             str(inputs)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)


def _own_prefix(final_name: str, pid: int) -> str:
    return f".tmp-{final_name}-{socket.gethostname()}-{pid}-"


def _kill_while_a_temporary_exists(process: subprocess.Popen, out: Path, final_name: str, rng: random.Random,
                                   timeout_seconds: float = 120) -> None:
    """SIGKILL the writer once a temporary of its own is there (an earlier round's orphan does not count)."""
    prefix = _own_prefix(final_name, process.pid)
    deadline = time.monotonic() + timeout_seconds
    try:
        while not any(path.name.startswith(prefix) for path in _temporaries(out)):
            if process.poll() is not None:
                # A small write can finish between two polls on a loaded machine: this round then
                # checks only that the artefact is whole; the caller runs more rounds.
                assert process.returncode == 0, "the writer failed on its own"
                return
            assert time.monotonic() < deadline, "the writer never created a temporary"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.05))
    finally:
        scenarios.kill_group(process)


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] if writer.slow else [])
                                  for name, writer in writers.WRITERS.items()])
def test_a_writer_killed_mid_write_leaves_only_orphans_that_the_next_write_removes(tmp_path, name):
    writer = writers.WRITERS[name]
    inputs, reference_dir, out = tmp_path / "inputs", tmp_path / "reference", tmp_path / "out"
    writers.prepare_inputs(inputs)
    writer.write(reference_dir, inputs)
    reference = writer.read(reference_dir / writer.final_name)
    out.mkdir()
    rng = random.Random(f"{SEED}-{name}")
    rounds_with_leftovers = 0
    for _round in range(12):
        if _round >= 3 and rounds_with_leftovers:
            break
        process = _start_writer(name, out, inputs)
        assert process.stdout.readline().strip() == "ready"
        _kill_while_a_temporary_exists(process, out, writer.final_name, rng)
        ledger.record("fault")
        leftovers = _temporaries(out)
        rounds_with_leftovers += bool(leftovers)
        # Only this writer's, so named that the next write removes them: the first write of this
        # round already removed what the previous round's killed writer left.
        prefix = _own_prefix(writer.final_name, process.pid)
        assert [path.name for path in leftovers if not path.name.startswith(prefix)] == [], \
            "a temporary the orphan cleanup does not recognise (or did not remove)"
        final = out / writer.final_name
        if final.exists():  # whole or absent, never half-written
            assert writer.read(final) == reference
    assert rounds_with_leftovers > 0, "no kill landed mid-write"
    writer.write(out, inputs)  # the rerun
    assert writer.read(out / writer.final_name) == reference
    assert sorted(path.name for path in out.iterdir()) == [writer.final_name]


def test_stale_temporaries_of_a_folder_are_removed_only_when_their_writer_is_gone(tmp_path):
    from scgrn_assets.lib.storage import remove_stale_temporaries, temporary_sibling

    killed = subprocess.run([sys.executable, "-c", "import sys, pathlib; from scgrn_assets.lib.storage import "
                             "temporary_sibling; t = temporary_sibling(pathlib.Path(sys.argv[1])); "
                             "t.write_text('half'); print(t)", str(tmp_path / "GSE1_RAW.tar")],
                            capture_output=True, text=True, check=True, cwd=ROOT)
    orphan = Path(killed.stdout.strip())
    alive = temporary_sibling(tmp_path / "GSE1_family.soft.gz")  # this process: still writing it
    alive.write_text("in progress")
    elsewhere = tmp_path / ".tmp-GSE1_RAW.tar-another-host-1-deadbeef"  # a writer on another machine
    elsewhere.write_text("in progress")
    ledger.record("fault")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not orphan.exists() and alive.exists() and elsewhere.exists()
