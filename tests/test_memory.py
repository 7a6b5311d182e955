"""Peak memory per stretch of work (`deepalign.memory.PeakMemory`): reset per stretch, nested stretches, no
figure where the reset is refused, and the runner's `memory/<stage>/...` metrics."""

from __future__ import annotations

import pytest

from deepalign import memory
from deepalign.memory import PeakMemory

MIB = 2**20


def touched(mib: int) -> bytearray:
    """`mib` MiB really resident (every page written)."""
    block = bytearray(mib * MIB)
    block[::4096] = b"x" * len(block[::4096])
    return block


def rss_gib(peak: PeakMemory) -> float:
    return peak.metrics("m")["m/peak_rss_gib"]


@pytest.fixture(autouse=True)
def needs_the_reset():
    with PeakMemory() as probe:
        pass
    if probe.rss_kib is None:
        pytest.skip("this kernel refuses to reset the RSS high-water mark (/proc/self/clear_refs)")


def test_each_stretch_starts_from_what_the_process_holds():
    with PeakMemory() as big:
        block = touched(300)
        del block
    with PeakMemory() as small:
        block = touched(20)
        del block
    assert rss_gib(big) - rss_gib(small) > 0.25  # the 300 MiB are gone from the second stretch's peak
    assert rss_gib(small) > 20 / 1024


def test_an_outer_stretch_keeps_the_peak_of_an_inner_one():
    with PeakMemory() as outer:
        with PeakMemory() as inner:
            block = touched(300)
            del block
        with PeakMemory() as later:
            pass
    assert rss_gib(outer) >= rss_gib(inner) > rss_gib(later) + 0.25
    assert PeakMemory._open == []


def test_no_rss_figure_where_the_reset_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    with PeakMemory() as refused:
        pass
    assert refused.metrics("memory/x") == {}  # not the whole process's peak under a stretch's name


def test_a_failing_stretch_is_closed():
    with pytest.raises(RuntimeError), PeakMemory():
        raise RuntimeError("stage failed")
    assert PeakMemory._open == []
