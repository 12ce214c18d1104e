"""verify_sleep: when a shrink's release counts as shown by more than the engine's word."""
from __future__ import annotations

from tidal.cluster.controller import ControllerConfig, verify_sleep

GB = 1 << 30
CFG = ControllerConfig(model="m", device="cuda")
HELD = {"kv_cache": 12 * GB, "weights": GB}
EMPTY = {"kv_cache": 0, "weights": 0}


def test_cpu_release_with_exact_bytes_and_rss_drop_verifies():
    cpu = ControllerConfig(model="m")
    r = verify_sleep(HELD, dict(HELD), EMPTY, rss_drop=12 * GB, device_drop=None, config=cpu)
    assert r["verified"] and r["counter"] == "process_rss"


def test_cuda_release_measured_in_allocator_segments_verifies():
    freed = {"kv_cache": 12 * GB + (2 << 20), "weights": GB - (3 << 20)}  # rounded to segments
    r = verify_sleep(HELD, freed, EMPTY, rss_drop=0, device_drop=13 * GB, config=CFG)
    assert r["verified"] and r["accounted"] and r["counter"] == "device_used"


def test_memory_the_allocator_kept_fails_verification():
    freed = {"kv_cache": 12 * GB, "weights": 0}  # the weights' memory stayed in the caching allocator
    r = verify_sleep(HELD, freed, EMPTY, rss_drop=0, device_drop=12 * GB, config=CFG)
    assert not r["verified"] and not r["accounted"]


def test_device_counter_that_did_not_drop_fails_verification():
    r = verify_sleep(HELD, dict(HELD), EMPTY, rss_drop=0, device_drop=GB, config=CFG)
    assert not r["verified"] and r["accounted"]


def test_state_still_holding_memory_fails_verification():
    r = verify_sleep(HELD, dict(HELD), {"kv_cache": 0, "weights": GB}, rss_drop=0, device_drop=13 * GB, config=CFG)
    assert not r["verified"] and not r["emptied"]
