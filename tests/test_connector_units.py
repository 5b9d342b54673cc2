"""Narrow unit tests of connector parts that need no servers: policy, arena allocator, settings, handshake check."""
from __future__ import annotations

import pytest

from splitzip_vllm.connector.config import ConfigError, SplitZipConfig
from splitzip_vllm.connector.policy import CompressionPolicy
from splitzip_vllm.transport.arena import ALIGN, ArenaFullError, ExtentAllocator

GB = 1e9


def test_auto_policy_compresses_on_a_slow_link():
    p = CompressionPolicy("auto")
    p.observe_encode(raw_bytes=4 << 20, wire_bytes=3 << 20, seconds=(4 << 20) / (5 * GB))   # 5 GB/s encode
    p.observe_transfer(wire_bytes=3 << 20, transfer_s=(3 << 20) / (0.125 * GB),              # 1 Gbit/s link
                       raw_bytes=4 << 20, decode_s=(4 << 20) / (6 * GB))
    assert p.should_compress()
    assert "compress" in p.describe()


def test_auto_policy_sends_raw_on_a_fast_link():
    p = CompressionPolicy("auto")
    p.observe_encode(raw_bytes=4 << 20, wire_bytes=3 << 20, seconds=(4 << 20) / (5 * GB))
    p.observe_transfer(wire_bytes=4 << 20, transfer_s=(4 << 20) / (25 * GB), raw_bytes=4 << 20,
                       decode_s=(4 << 20) / (6 * GB))                                        # 200 Gbit/s link
    assert not p.should_compress()
    assert p.describe().endswith("-> raw")


def test_auto_policy_threshold_is_the_break_even_point():
    # compress <=> 1/E + 1/D < (1 - 1/r)/B ; with E = D = 8 GB/s and r = 4/3 the break-even link is 1 GB/s
    for link, expect in ((0.9 * GB, True), (1.1 * GB, False)):
        p = CompressionPolicy("auto")
        p.observe_encode(4_000_000, 3_000_000, 4_000_000 / (8 * GB))
        p.observe_transfer(3_000_000, 3_000_000 / link, 4_000_000, 4_000_000 / (8 * GB))
        assert p.should_compress() is expect, link


def test_fixed_policies_and_unmeasured_auto():
    assert CompressionPolicy("always").should_compress()
    assert not CompressionPolicy("never").should_compress()
    assert CompressionPolicy("auto").should_compress()  # nothing measured yet
    with pytest.raises(ValueError):
        CompressionPolicy("sometimes")


def test_extent_allocator_first_fit_shrink_and_coalesce():
    a = ExtentAllocator(10 * ALIGN)
    x = a.allocate(3 * ALIGN)
    y = a.allocate(3 * ALIGN)
    z = a.allocate(4 * ALIGN)
    assert (x, y, z) == (0, 3 * ALIGN, 6 * ALIGN)
    with pytest.raises(ArenaFullError, match="no free extent"):
        a.allocate(1)
    a.shrink(y, 1)                      # keeps one aligned unit
    assert a.size_of(y) == ALIGN and a.largest_free() == 2 * ALIGN
    a.free(x)
    a.free(z)
    assert a.largest_free() == 6 * ALIGN  # tail of y coalesced with z: [4,10); [0,3) stays apart
    a.free(y)
    assert a.used_bytes == 0 and a.largest_free() == 10 * ALIGN and a.num_extents == 0


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="unknown SplitZipConnector setting"):
        SplitZipConfig.from_extra({"codebok": "auto"})
    with pytest.raises(ConfigError, match="compression must be one of"):
        SplitZipConfig.from_extra({"compression": "maybe"})
    with pytest.raises(ConfigError, match="does not exist"):
        SplitZipConfig.from_extra({"codebook": str(tmp_path / "missing.json")})
    with pytest.raises(ConfigError, match="progress_delay_us"):
        SplitZipConfig.from_extra({"progress_delay_us": -5})
    auto = SplitZipConfig.from_extra({})
    assert auto.resolved_progress_delay_us(kv_on_cpu=True) == 1000
    assert auto.resolved_progress_delay_us(kv_on_cpu=False) == 0
    assert SplitZipConfig.from_extra({"progress_delay_us": 0}).resolved_progress_delay_us(True) == 0
    cfg = SplitZipConfig.from_extra({"kv_lease_duration": 5, "side_channel_port": 7000})
    assert cfg.resolved_side_channel(2) == (cfg.side_channel_host or "localhost", 7002) or \
        cfg.resolved_side_channel(2)[1] == 7002


def test_auto_policy_probes_compression_while_raw():
    p = CompressionPolicy("auto")
    p.observe_encode(4 << 20, 3 << 20, (4 << 20) / (5 * GB))
    p.observe_transfer(4 << 20, (4 << 20) / (25 * GB), 4 << 20, (4 << 20) / (6 * GB))  # fast link: raw
    decisions = [p.decide() for _ in range(2 * CompressionPolicy.PROBE_EVERY)]
    assert decisions.count(True) == 2 and decisions[CompressionPolicy.PROBE_EVERY - 1]
    assert CompressionPolicy("never").decide() is False and CompressionPolicy("always").decide() is True


def test_settings_with_bad_values_name_the_setting_and_the_expected_type():
    for extra, expect in (({"arena_bytes": "lots"}, "arena_bytes: expected `int`, got `str`"),
                          ({"arena_bytes": -1}, "arena_bytes: expected `int` >= 1048576"),
                          ({"kv_lease_duration": "ten"}, "kv_lease_duration: expected `float`, got `str`"),
                          ({"kv_lease_duration": 0}, "kv_lease_duration: expected `float` > 0.0"),
                          ({"chunk_log2": 16}, "chunk_log2: expected `int` <= 15"),
                          ({"recv_buffer_bytes": True}, "recv_buffer_bytes: expected `int`, got `bool`"),
                          ({"piece_tokens": 0}, "piece_tokens: expected `int` >= 1"),
                          ({"allow_model_mismatch": "yes"}, "allow_model_mismatch: expected `bool`, got `str`"),
                          ({"backends": "UCX"}, "backends: expected `array`, got `str`")):
        with pytest.raises(ConfigError) as e:
            SplitZipConfig.from_extra(extra)
        assert expect in str(e.value), (extra, str(e.value))
    assert SplitZipConfig.from_extra({"kv_lease_duration": 10}).kv_lease_duration == 10.0  # ints are seconds too


def test_transfer_tags_differ_by_engine_request_rank_payload_and_allocation():
    from splitzip_vllm.connector.binding import new_nonce, transfer_tag
    base = ("engine-a", "req-1", 0, 3, 12345)
    tags = {transfer_tag(*base)}
    for i, other in enumerate(("engine-b", "req-2", 1, 4, 12346)):
        args = list(base)
        args[i] = other
        tags.add(transfer_tag(*args))
    assert len(tags) == 6 and 0 not in tags
    assert transfer_tag(*base) == transfer_tag(*base)           # decode derives the same value
    nonces = {new_nonce() for _ in range(1000)}
    assert len(nonces) == 1000 and all(0 < n < 2**52 for n in nonces)  # JSON-safe, never "unbound"


def test_ticket_table_revoke_zeroes_before_reuse():
    from splitzip_vllm.connector.binding import TicketTable, TicketTableFullError
    t = TicketTable(2)
    s1, v1 = t.issue()
    s2, v2 = t.issue()
    assert {s1, s2} == {0, 1} and t.value(s1) == v1 and t.value(s2) == v2 and v1 != v2
    assert t.address(s2) - t.address(s1) == 8 * (s2 - s1)
    with pytest.raises(TicketTableFullError):
        t.issue()
    t.revoke(s1)
    assert t.value(s1) == 0 and t.in_use == 1      # a late ticket READ of s1 now sees 0
    s3, v3 = t.issue()
    assert s3 == s1 and v3 != v1                   # the reused slot holds a new value
