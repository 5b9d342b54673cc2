"""The arithmetic behind BENCHMARKS.md's end-to-end gain tables (benchmarks/e2e_ttft_bench.py: analyse)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("e2e_ttft_bench", ROOT / "benchmarks" / "e2e_ttft_bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["e2e_ttft_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def _point(connector: str, **kw) -> dict:
    base = {"connector": connector, "rate_gbit": 1.0, "length": 512, "compression": None}
    base.update(kw)
    return base


def test_f_ceiling_and_the_three_gains(bench):
    nixl = _point("nixl", ttft_mean=10.0, ttft_p50=10.0, xfer_s_per_req=5.0, prefill_server_ttft_mean=4.0,
                  decode_server_ttft_mean=6.0)
    # SplitZip: faster prefill (must not count in the same-prefill gain), encode 0.1 s, shorter hand-off
    sz = _point("sz-always", compression="always", ttft_p50=6.0, ratio=4 / 3, prefill_server_ttft_mean=2.1,
                encode_s_per_req=0.1, decode_server_ttft_mean=4.5)
    (row,) = bench.analyse([nixl, sz])
    assert row["f"] == pytest.approx(0.5)
    assert row["ceiling"] == pytest.approx(1 / (0.5 + 0.5 * 0.75))
    assert row["gain_always"] == pytest.approx(10.0 / 6.0)                 # client-side: everything included
    assert row["handoff_gain_always"] == pytest.approx(6.0 / 4.5)
    # same prefill (NIXL's 4.0 s) for both: 4 + 6 vs 4 + 0.1 + 4.5
    assert row["norm_gain_always"] == pytest.approx(10.0 / 8.6)
    assert row["norm_gain_always_over_ceiling"] == pytest.approx(10.0 / 8.6 / row["ceiling"])
    assert "gain_auto" not in row                                         # no "auto" point measured


def test_rows_need_a_nixl_baseline(bench):
    sz = _point("sz-auto", compression="auto", ttft_p50=1.0, ratio=1.33, prefill_server_ttft_mean=0.5,
                decode_server_ttft_mean=0.4)
    assert bench.analyse([sz]) == []


def test_slow_rates_only_for_short_inputs(bench):
    plan = bench.Plan(lengths=[512, 2048, 8192], rates=[0.05, 1.0, None], requests={}, conc=1, conc_requests=0,
                      conc_max_len=0, max_tokens=16, kv_gib=1, arena_bytes=0, recv_bytes=0, max_model_len=9000,
                      server_args=[], deadline=0.0, long_len=2048, long_rates=[1.0], slow_rates=[0.05],
                      slow_max_len=512)
    assert bench.rates_for(plan, 512) == [0.05, 1.0, None]
    assert bench.rates_for(plan, 2048) == [1.0, None]
    assert bench.rates_for(plan, 8192) == [1.0]
