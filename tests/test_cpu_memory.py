"""hetrain.cpu_memory: hetrain's CPU allocator keeps large freed blocks, mapped and faulted in, for reuse."""

import json
import multiprocessing
import subprocess
import sys
import threading

import pytest
import torch

from hetrain import _ext, cpu_memory

pytestmark = pytest.mark.skipif(_ext.load() is None, reason="hetrain's CPU allocator is in hetrain._C")

MiB = 1 << 20

# Allocates and writes a 48 MiB tensor (above glibc's highest automatic mmap threshold) ten times, then a 96 MiB
# one from a thread, with a small tensor kept alive after each (long-lived small allocations between large ones:
# on glibc's heap they would leave holes); prints the minor page faults per round after two, and the resident
# memory left.
FAULTS = """
import json, resource, sys, threading
import torch
from hetrain import cpu_memory
setting = cpu_memory.apply(sys.argv[1])
kept = []

def faults_per_round(numel):
    for _ in range(2):
        torch.empty(numel).normal_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(numel).normal_()
        kept.append(torch.empty(64))
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

result = {"setting": setting.description, "main": faults_per_round(12 << 20)}
thread = threading.Thread(target=lambda: result.update(thread=faults_per_round(24 << 20)))
thread.start(); thread.join()
result["rss_mib"] = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() >> 20
print(json.dumps(result))
"""


def page_faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kept_blocks_are_reused_without_page_faults_in_the_main_thread_and_others():
    system, keep = page_faults("system"), page_faults("keep")
    assert keep["setting"].startswith("keep (freed blocks of 32 MiB") and system["setting"] == "system (as configured)"
    # torch's allocator on glibc: each round maps fresh pages and faults them in (fewer with huge pages).
    assert system["main"] > 48 * MiB / (2 * MiB) and system["thread"] > 96 * MiB / (2 * MiB), system
    # Kept: the freed block serves the next round; at most a few pages of bookkeeping fault.
    assert keep["main"] < 16 and keep["thread"] < 16, keep
    # Small allocations between the large ones leave no unusable holes: resident memory stays near the system's.
    assert keep["rss_mib"] < system["rss_mib"] + 48 + 96 + 64, (keep, system)


@pytest.fixture
def kept():
    """The allocator on for requests of 8 MiB or more, at most 64 MiB kept; back to torch's after the test."""
    setting = cpu_memory.keep_freed_blocks(min_bytes=8 * MiB, max_cached_bytes=64 * MiB)
    assert setting.applied, setting
    cpu_memory.empty_cache()
    yield
    cpu_memory.system()


def test_a_freed_block_serves_the_next_request_of_about_its_size(kept):
    before = cpu_memory.stats()
    a = torch.randn(3 * MiB)  # 12 MiB
    ptr = a.data_ptr()
    del a
    b = torch.empty(11 * MiB, dtype=torch.uint8)  # within a quarter of the kept block: reused
    assert b.data_ptr() == ptr
    c = torch.empty(4 * MiB, dtype=torch.uint8)  # under min_bytes: torch's own allocator
    after = cpu_memory.stats()
    assert (after.reused - before.reused, after.mapped - before.mapped) == (1, 1)
    assert after.live_bytes - before.live_bytes == 12 * MiB and c.data_ptr() != ptr
    b.fill_(3)
    assert int(b.sum()) == 3 * 11 * MiB  # the reused block is ordinary memory


def test_blocks_over_the_cap_are_unmapped_oldest_first(kept):
    before = cpu_memory.stats()
    tensors = [torch.empty(24 * MiB, dtype=torch.uint8) for _ in range(3)]
    del tensors  # 72 MiB freed under a 64 MiB cap: the first freed is unmapped
    after = cpu_memory.stats()
    assert after.cached_bytes == 48 * MiB and after.unmapped - before.unmapped == 1
    assert after.peak_mapped_bytes >= 72 * MiB
    cpu_memory.empty_cache()
    assert cpu_memory.stats().cached_bytes == 0


def test_blocks_freed_in_another_thread_and_after_switching_back_come_back(kept):
    made = []
    thread = threading.Thread(target=lambda: made.append(torch.ones(4 * MiB)))
    thread.start()
    thread.join()
    assert cpu_memory.stats().live_bytes >= 16 * MiB
    live = torch.ones(4 * MiB)
    cpu_memory.system()
    mapped = cpu_memory.stats().mapped
    plain = torch.ones(4 * MiB)  # torch's allocator now
    assert cpu_memory.stats().mapped == mapped and not cpu_memory.stats().enabled
    del made[:], live, plain
    assert cpu_memory.stats().live_bytes == 0 and cpu_memory.stats().cached_bytes == 0


def test_the_profiler_sees_kept_blocks_allocated_and_freed(kept):
    torch.empty(16 * MiB, dtype=torch.uint8)  # mapped once, kept: the profiled one is a reused block
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        x = torch.empty(16 * MiB, dtype=torch.uint8)
        del x
    usage = [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage]
    assert usage == [("aten::empty", 16 * MiB), ("[memory]", -16 * MiB)]  # as torch's allocator reports its own


def _child_allocates() -> None:
    torch.set_num_threads(1)  # as DataLoader workers do: the parent's OpenMP threads do not exist in a fork
    torch.ones(4 * MiB).sum()


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_a_forked_child_can_allocate_while_other_threads_use_the_cache(kept):
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            torch.empty(2 * MiB)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        context = multiprocessing.get_context("fork")
        for _ in range(5):
            child = context.Process(target=_child_allocates)
            child.start()
            child.join(timeout=60)
            assert child.exitcode == 0, "a forked child hung or failed allocating"
    finally:
        stop.set()
        worker.join()


def test_a_request_the_system_cannot_map_raises_out_of_memory_naming_the_fix(kept):
    with pytest.raises(torch.OutOfMemoryError, match="hetrain: could not map .* cpu_malloc=system"):
        torch.empty(1 << 50, dtype=torch.uint8)


def test_host_memory_keeps_blocks_for_its_block_only_unless_the_cache_was_on_before():
    assert not cpu_memory.stats().enabled
    with cpu_memory.host_memory("keep") as setting:
        assert setting.applied and cpu_memory.stats().enabled
    assert not cpu_memory.stats().enabled
    with cpu_memory.host_memory("system") as setting:
        assert not setting.applied and not cpu_memory.stats().enabled
    cpu_memory.keep_freed_blocks()
    try:
        with cpu_memory.host_memory("keep"):
            pass
        assert cpu_memory.stats().enabled  # on before the block: left on
    finally:
        cpu_memory.system()


def test_host_memory_nested_in_an_enabled_cache_gives_back_its_settings():
    # The inner block's own settings stayed: "system" turned the outer cache off for good, and "keep" replaced its
    # min_bytes and cap with the defaults (32 MiB, a quarter of memory).
    cpu_memory.keep_freed_blocks(min_bytes=8 * MiB, max_cached_bytes=64 * MiB)
    try:
        for inner in ("system", "keep"):
            with cpu_memory.host_memory(inner):
                pass
            after = cpu_memory.stats()
            assert after.enabled, f"an inner {inner} block turned the cache off"
            assert (after.min_bytes, after.max_cached_bytes) == (8 * MiB, 64 * MiB), inner
        cpu_memory.empty_cache()
        before = cpu_memory.stats()
        torch.empty(16 * MiB, dtype=torch.uint8)  # over min_bytes: kept when freed, and reused
        torch.empty(16 * MiB, dtype=torch.uint8)
        tensors = [torch.empty(24 * MiB, dtype=torch.uint8) for _ in range(3)]
        del tensors  # 88 MiB freed under the 64 MiB cap
        after = cpu_memory.stats()
        assert after.reused - before.reused == 1 and after.cached_bytes == 48 * MiB
    finally:
        cpu_memory.system()


def test_the_default_cap_is_a_quarter_of_a_containers_limit_where_one_is_set(tmp_path):
    machine = cpu_memory.memory_limit_bytes(tmp_path)  # no cgroup files: the machine's memory
    assert machine > 0
    (tmp_path / "memory.max").write_text("max\n")  # cgroup v2 without a limit
    assert cpu_memory.memory_limit_bytes(tmp_path) == machine
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{1 << 30}\n")  # cgroup v1 with one
    assert cpu_memory.memory_limit_bytes(tmp_path) == min(machine, 1 << 30)
    (tmp_path / "memory.max").write_text(f"{512 << 20}\n")
    assert cpu_memory.memory_limit_bytes(tmp_path) == min(machine, 512 << 20)


def test_a_limit_on_the_processs_own_cgroup_counts_where_the_root_shows_none(tmp_path):
    # Only the mount's root was read: under a systemd unit's or a batch job's limit (no cgroup view of its own) the
    # cache could keep a quarter of the machine, more than the job may use.
    root, own = tmp_path / "cgroup", tmp_path / "self_cgroup"
    machine = cpu_memory.memory_limit_bytes(root, own)
    (root / "jobs" / "job_1" / "step").mkdir(parents=True)
    (root / "memory.max").write_text("max\n")
    (root / "jobs" / "job_1" / "memory.max").write_text(f"{2 << 30}\n")
    (root / "jobs" / "job_1" / "step" / "memory.max").write_text("max\n")
    own.write_text("0::/jobs/job_1/step\n")
    assert cpu_memory.memory_limit_bytes(root, own) == min(machine, 2 << 30)
    (root / "memory" / "batch").mkdir(parents=True)  # v1: the memory controller's own hierarchy
    (root / "memory" / "batch" / "memory.limit_in_bytes").write_text(f"{1 << 30}\n")
    own.write_text("5:cpu,cpuacct:/batch\n4:memory:/batch\n")
    assert cpu_memory.memory_limit_bytes(root, own) == min(machine, 1 << 30)


def test_an_unknown_mode_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="cpu_malloc='cache' is not a choice: use keep .* or system"):
        cpu_memory.apply("cache")


def test_bad_sizes_are_refused_naming_them():
    with pytest.raises(RuntimeError, match="min_bytes must be positive"):
        cpu_memory.keep_freed_blocks(min_bytes=0)


def test_an_extension_lacking_the_caches_ops_leaves_torchs_allocator_naming_the_rebuild(monkeypatch):
    """A stale hetrain._C may lack ops the sources call: stats() and apply() raised AttributeError from torch.ops."""
    from hetrain import env

    monkeypatch.setattr(cpu_memory, "_HOST_OPS", ("host_cache_stats", "host_cache_from_newer_sources"), raising=False)
    assert cpu_memory.stats() is None
    setting = cpu_memory.apply("keep")
    assert not setting.applied
    assert "hetrain._C lacks host_cache_from_newer_sources, so it is a stale build" in setting.description
    assert "rebuild it with: pip install -e . --no-build-isolation" in setting.description
    assert env._host_allocator().startswith("torch's (no host block cache: hetrain._C lacks")


def test_the_description_gives_each_size_in_the_unit_that_fits_it():
    """In fixed units a 768 KiB threshold read "0 MiB or more" and a 40 MiB cap "0.0 GiB kept"."""
    try:
        for min_bytes, cap, says in ((768 << 10, 40 * MiB, "768 KiB or more reused, up to 40 MiB kept"),
                                     (3 * MiB // 2, 11 << 29, "1.5 MiB or more reused, up to 5.5 GiB kept")):
            setting = cpu_memory.keep_freed_blocks(min_bytes=min_bytes, max_cached_bytes=cap)
            assert setting.description == f"keep (freed blocks of {says})"
    finally:
        cpu_memory.system()
