"""Scheduler-side paths without servers: chunked prefill, publish/abort on prefill, heartbeats, abort of an
in-flight load and full prefix hits on decode (vLLM's Request / block objects stood in for by plain objects)."""
from __future__ import annotations

import time
from types import SimpleNamespace

from vllm.v1.request import RequestStatus

from splitzip_vllm.connector.config import SplitZipConfig
from splitzip_vllm.connector.metadata import SplitZipWorkerMetadata
from splitzip_vllm.connector.scheduler import SplitZipScheduler

BLOCK = 128


def sched(lease: float = 30.0) -> SplitZipScheduler:
    cfg = SplitZipConfig.from_extra({"kv_lease_duration": lease, "side_channel_port": 7777})
    vc = SimpleNamespace(cache_config=SimpleNamespace(block_size=BLOCK),
                         parallel_config=SimpleNamespace(tensor_parallel_size=1, data_parallel_index=0))
    s = SplitZipScheduler(vc, "engine-P", cfg)
    s.kv_cache_manager = SimpleNamespace(get_block_ids=lambda rid: ([11, 12, 13, 14],))
    return s


def request(rid: str, n_prompt: int, params: dict | None, computed: int = 0, status=RequestStatus.RUNNING):
    return SimpleNamespace(request_id=rid, kv_transfer_params=params, prompt_token_ids=list(range(n_prompt)),
                           num_prompt_tokens=n_prompt, num_computed_tokens=computed, status=status)


def step(s: SplitZipScheduler, scheduled: dict[str, int]):
    return s.build_connector_meta(SimpleNamespace(num_scheduled_tokens=scheduled))


def output(manifests=None, finished_recving=()):
    meta = SplitZipWorkerMetadata(manifests) if manifests else None
    return SimpleNamespace(kv_connector_worker_meta=meta, finished_recving=set(finished_recving))


def test_chunked_prefill_publishes_once_the_prompt_is_complete():
    s = sched()
    r = request("a", 300, {"do_remote_decode": True})
    s.update_state_after_alloc(r, None, 0)
    assert step(s, {"a": 128}).reqs_to_encode == {}                    # first chunk: prompt not complete
    r.num_computed_tokens = 128
    assert step(s, {"a": 172}).reqs_to_encode == {"a": [11, 12, 13]}  # 3 blocks hold 300 tokens
    assert step(s, {"a": 1}).reqs_to_encode == {}                      # published once


def test_a_step_with_nothing_scheduled_is_marked_idle():
    s = sched()   # the worker sleeps IDLE_STEP_WAIT_S on such steps instead of spinning (test_connector_flow.py)
    assert step(s, {}).idle_step and step(s, {"a": 0}).idle_step
    assert not step(s, {"a": 1}).idle_step


def test_finished_prefill_returns_params_with_the_manifests_of_the_step():
    s = sched()
    r = request("a", 200, {"do_remote_decode": True})
    s.update_state_after_alloc(r, None, 0)
    step(s, {"a": 200})
    r.status = RequestStatus.FINISHED_LENGTH_CAPPED
    delay, params = s.request_finished(r, [11, 12, 13, 14])
    assert delay and params["remote_block_ids"] == [[11, 12]] and params["remote_request_id"] == "a"
    assert params["splitzip"] is None                                   # filled by this step's worker output
    s.update_connector_output(output({"a": {0: {"mode": "splitzip", "rank": 0, "num_blocks": 2}}}))
    assert params["splitzip"]["manifests"] == [{"mode": "splitzip", "rank": 0, "num_blocks": 2}]
    assert params["splitzip"]["blocks_per_piece"] == 1 and params["tp_size"] == 1


def test_prefill_abort_before_or_after_publishing():
    s = sched()
    early = request("early", 300, {"do_remote_decode": True}, status=RequestStatus.FINISHED_ABORTED)
    s.update_state_after_alloc(early, None, 0)
    assert s.request_finished(early, [11]) == (False, None)             # nothing was published
    late = request("late", 100, {"do_remote_decode": True})
    s.update_state_after_alloc(late, None, 0)
    step(s, {"late": 100})
    late.status = RequestStatus.FINISHED_ABORTED
    assert s.request_finished(late, [11]) == (False, None)
    assert step(s, {}).reqs_not_sent == {"late"}                        # the worker unpublishes it


def _remote_params():
    return {"do_remote_prefill": True, "remote_engine_id": "engine-P", "remote_request_id": "p-1",
            "remote_host": "h", "remote_port": 1, "remote_block_ids": [[5, 6, 7]], "tp_size": 1,
            "splitzip": {"protocol": 4, "blocks_per_piece": 1, "manifests": [{"mode": "splitzip"}]}}


def _blocks(n_hashed: int, unhashed: list[int]):
    b = [SimpleNamespace(block_hash=object(), is_null=False) for _ in range(n_hashed)]
    b += [SimpleNamespace(block_hash=None, is_null=False) for _ in unhashed]
    return SimpleNamespace(blocks=[b], get_unhashed_block_ids=lambda: unhashed)


def test_decode_load_heartbeats_and_abort_while_loading():
    s = sched(lease=0.6)
    r = request("d", 300, _remote_params())
    s.on_new_request(r)
    assert s.get_num_new_matched_tokens(r, 128) == (172, True)
    s.update_state_after_alloc(r, _blocks(1, [21, 22]), 172)
    meta = step(s, {})
    recv = meta.reqs_to_recv["d"]
    assert recv.local_block_ids == [21, 22] and recv.skip_blocks == 1 and recv.remote.request_id == "p-1"
    assert [rids for _, rids in meta.heartbeats] == [["p-1"]]
    assert step(s, {}).heartbeats == []                                 # at most every lease/6
    time.sleep(0.11)
    assert [rids for _, rids in step(s, {}).heartbeats] == [["p-1"]]
    r.status = RequestStatus.FINISHED_ABORTED
    assert s.request_finished(r, [21, 22]) == (False, None)
    assert step(s, {}).reqs_to_cancel == {"d"}                          # the worker stops reading
    s.update_connector_output(output(finished_recving=["d"]))
    time.sleep(0.11)
    assert step(s, {}).heartbeats == []


def test_decode_preemption_after_the_load_recomputes_and_never_reads_again():
    # vLLM preempts running requests only; one waiting for its KV is not running. Once loaded and running, a
    # preempted request loses its blocks and is scheduled again from token 0: it must not read prefill's copy
    # again (prefill freed it on Done), and it gets no heartbeats.
    s = sched(lease=0.6)
    r = request("d", 300, _remote_params())
    s.on_new_request(r)
    assert s.get_num_new_matched_tokens(r, 0) == (300, True)
    s.update_state_after_alloc(r, _blocks(0, [21, 22, 23]), 300)
    assert list(step(s, {}).reqs_to_recv) == ["d"]
    s.update_connector_output(output(finished_recving=["d"]))
    r.num_computed_tokens = 0                                           # preempted, rescheduled
    assert s.get_num_new_matched_tokens(r, 0) == (0, False)
    s.update_state_after_alloc(r, _blocks(0, [31, 32, 33]), 0)
    time.sleep(0.11)
    meta = step(s, {"d": 300})
    assert meta.reqs_to_recv == {} and meta.reqs_to_release == {} and meta.heartbeats == []


def test_decode_full_prefix_hit_releases_the_prefill_copy():
    s = sched()
    r = request("d", 300, _remote_params())
    assert s.get_num_new_matched_tokens(r, 300) == (0, False)
    s.update_state_after_alloc(r, _blocks(3, []), 0)
    assert list(step(s, {}).reqs_to_release) == ["d"]


def test_decode_without_a_splitzip_manifest_computes_locally():
    s = sched()
    params = _remote_params()
    params["splitzip"] = None
    assert s.get_num_new_matched_tokens(request("x", 300, params), 0) == (0, False)
