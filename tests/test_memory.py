"""Memory per stretch of work (`deepalign.memory.PeakMemory`): the process's RSS high-water mark at the end of
a stretch (never reset: what getrusage reports stays the whole process's) and the runner's metrics."""

from __future__ import annotations

import resource

import pytest

from deepalign.memory import PeakMemory, rss_high_water_kib

MIB = 2**20


def touched(mib: int) -> bytearray:
    """`mib` MiB really resident (every page written)."""
    block = bytearray(mib * MIB)
    block[::4096] = b"x" * len(block[::4096])
    return block


@pytest.fixture(autouse=True)
def needs_proc():
    if rss_high_water_kib() is None:
        pytest.skip("no /proc/self/status VmHWM on this system")


def test_the_stretch_that_raises_the_high_water_mark_shows_it():
    before = rss_high_water_kib()
    with PeakMemory() as big:
        block = touched(before // 1024 + 300)  # beyond anything the process held so far
        del block
    with PeakMemory() as later:
        pass
    rise = big.metrics("m")["m/rss_high_water_gib"] - before / 2**20
    assert rise > 0.25
    assert later.metrics("m") == big.metrics("m")  # the mark stays: it is the process's peak so far
    assert PeakMemory._open == []


def test_the_process_peak_that_getrusage_reports_is_left_alone():
    with PeakMemory():
        block = touched(rss_high_water_kib() // 1024 + 100)
        del block
    with PeakMemory():
        pass
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >= rss_high_water_kib() - 1024


def test_a_failing_stretch_is_closed():
    with pytest.raises(RuntimeError), PeakMemory():
        raise RuntimeError("stage failed")
    assert PeakMemory._open == []


def test_release_memory_returns_freed_heap_pages():
    """Many small freed blocks stay resident in glibc's heap until `release_memory` trims it."""
    import torch

    from deepalign.memory import release_memory, rss_kib

    release_memory()
    start = rss_kib()
    blocks = [torch.ones(16 * 1024) for _ in range(6000)]  # 64 KiB each, ~375 MiB, below mmap's threshold
    grown = rss_kib()
    del blocks
    release_memory()
    after = rss_kib()
    assert grown - start > 300 * 1024
    assert after - start < 50 * 1024, f"{(after - start) / 1024:.0f} MiB still resident"


def test_the_runner_hands_memory_back_after_every_stage(tmp_path, monkeypatch):
    """After a stage that saved no model the runner returns what the stage freed (engines, caches,
    activations) before the next stage starts (after a model-saving stage, `forget_model` does)."""
    from conftest import compose_config

    from deepalign import cli, runner
    from deepalign.context import RunContext

    calls: list[str] = []
    monkeypatch.setattr(runner, "release_memory", lambda: calls.append("runner"))
    monkeypatch.setattr(RunContext, "forget_model", lambda self: calls.append("forget"))
    cli.run(compose_config(["model=tiny", "logger=none", "stages=[probe]"]), tmp_path / "run")
    assert calls == ["runner"]
