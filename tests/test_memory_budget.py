"""docs/DEPLOYMENT.md against the code: the memory table equals what connector/budget.py computes from the code that
allocates the buffers, every SplitZipConfig field is in the settings table with its real default, and the
staging check names the setting that is too small."""
from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest
import torch

from splitzip_vllm.connector import consumer as consumer_mod
from splitzip_vllm.connector import mailbox as mailbox_mod
from splitzip_vllm.connector import producer as producer_mod
from splitzip_vllm.connector.budget import ModelGeometry, check_staging, memory_budget
from splitzip_vllm.connector.config import ConfigError, SplitZipConfig
from splitzip_vllm.connector.kv_layout import KVGeometry, KVLayout
from splitzip_vllm.connector.policy import CompressionPolicy
from splitzip_vllm.connector.producer import Producer
from splitzip_vllm.connector.stats import SplitZipStats

DOC = Path(__file__).resolve().parents[1] / "docs" / "DEPLOYMENT.md"
MODELS = {("Llama-3-8B", 1): ModelGeometry(num_layers=32, total_kv_heads=8, head_size=128, block_size=16, tp_size=1),
          ("Llama-3-70B", 8): ModelGeometry(num_layers=80, total_kv_heads=8, head_size=128, block_size=16, tp_size=8)}
REQUEST_TOKENS = 8192


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table in ``text`` as (header cells, rows of cells)."""
    out, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-|: ]+\|$", lines[i + 1]):
            head = _cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            out.append((head, rows))
        else:
            i += 1
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(first_header: str, must_have: str) -> tuple[list[str], list[list[str]]]:
    for head, rows in _tables(DOC.read_text()):
        if head[0] == first_header and must_have in head:
            return head, rows
    raise AssertionError(f"docs/DEPLOYMENT.md has no table with columns {first_header!r} ... {must_have!r}")


def _number(cell: str) -> int | None:
    """``67,108,864 (64 MiB)`` -> 67108864; ``—`` -> None."""
    if cell in ("—", "-", ""):
        return None
    m = re.match(r"^([\d,]+)", cell)
    assert m, f"not a number: {cell!r}"
    return int(m.group(1).replace(",", ""))


def _expected_row(b) -> dict[str, int | None]:
    return {
        "device bytes": b.device_bytes,
        "host bytes": b.host_bytes,
        "transient device bytes": b.transient_device_bytes,
        "blocks per piece": b.blocks_per_piece,
        "piece bytes": b.piece_raw_bytes,
        "piece slot bytes": b.piece_slot_bytes,
        "pieces per staging buffer": b.arena_pieces if b.producer else b.recv_pieces,
        "KV block bytes": b.block_bytes,
        f"index bytes per {REQUEST_TOKENS}-token request": b.index_bytes_for(REQUEST_TOKENS) if b.producer else None,
        f"{REQUEST_TOKENS}-token requests in `index_bytes`": b.index_requests(REQUEST_TOKENS) if b.producer else None,
    }


def test_memory_table_matches_the_code():
    head, rows = _table("model", "device bytes")
    seen = set()
    for row in rows:
        cell = dict(zip(head, row))
        key = (cell["model"], int(cell["TP"]))
        assert key in MODELS, f"memory table row for unknown model {key}"
        role = cell["role"]
        b = check_staging(SplitZipConfig(), MODELS[key], role)
        for col, want in _expected_row(b).items():
            assert col in cell, f"memory table lacks column {col!r}"
            assert _number(cell[col]) == want, (key, role, col, cell[col], want)
        seen.add((key, role))
    assert seen == {(k, r) for k in MODELS for r in ("prefill", "decode")}, seen


def test_budget_items_follow_the_settings_and_constants():
    cfg = SplitZipConfig(arena_bytes=3 << 20, recv_buffer_bytes=5 << 20, index_bytes=1 << 20)
    geo = MODELS[("Llama-3-8B", 1)]
    p, d, both = (memory_budget(cfg, geo, r) for r in ("kv_producer", "kv_consumer", "kv_both"))
    assert p.device_bytes == 3 << 20 and d.device_bytes == 5 << 20 and both.device_bytes == 8 << 20
    assert p.host_bytes == (1 << 20) + producer_mod.SEND_TICKET_SLOTS * 8 + mailbox_mod.SLOTS * 64
    assert d.host_bytes == consumer_mod.INDEX_LANDING_BYTES + consumer_mod.RECV_TICKET_SLOTS * 8
    assert both.host_bytes == p.host_bytes + d.host_bytes
    assert both.transient_device_bytes == 2 * p.transient_device_bytes
    with pytest.raises(ValueError, match="role"):
        memory_budget(cfg, geo, "router")
    with pytest.raises(ValueError, match="TP size 16 does not divide the model's 8 KV heads"):
        ModelGeometry(80, 8, 128, 16, tp_size=16)


@pytest.mark.parametrize("block_size,piece_tokens", [(16, 128), (64, 128), (16, 16), (128, 64)])
def test_piece_sizes_equal_a_real_producer_and_layout(block_size, piece_tokens):
    """The budget's piece size and arena slot are what a real KVLayout/Producer use (CPU, tiny cache)."""
    heads, head_size, layers = 2, 64, 3
    kv = {f"l{i}": torch.zeros(4, heads, block_size, 2 * head_size, dtype=torch.bfloat16) for i in range(layers)}
    layout = KVLayout(kv, KVGeometry(block_size, heads, head_size))
    geo = ModelGeometry.from_layout(layout, tp_size=4, total_kv_heads=4 * heads)
    cfg = SplitZipConfig(piece_tokens=piece_tokens)
    b = memory_budget(cfg, geo, "kv_both")
    prod = Producer(engine_id="E", tp_rank=0, layout=layout, arena_bytes=1 << 20, index_bytes_=1 << 16, lease_s=1.0,
                    backend=None, policy=CompressionPolicy("never"), stats=SplitZipStats(), chunk_log2=12,
                    codebook_source=lambda ids: None)
    try:
        assert b.piece_slot_bytes == prod.piece_capacity(b.blocks_per_piece)
        assert b.piece_raw_bytes == layout.piece_bytes * b.blocks_per_piece
        assert b.block_bytes == layout.block_bytes
        assert b.blocks_per_piece == max(1, piece_tokens // block_size)
    finally:
        prod.close()


def test_staging_check_names_the_setting():
    geo = MODELS[("Llama-3-8B", 1)]
    big = SplitZipConfig(piece_tokens=16 * 1024)          # 1024 blocks: an 8 MiB piece
    with pytest.raises(ConfigError, match=r"arena_bytes=67108864 cannot hold one piece .*piece_tokens"):
        check_staging(SplitZipConfig(piece_tokens=1 << 18), geo, "kv_producer")   # 128 MiB pieces
    with pytest.raises(ConfigError, match=r"recv_buffer_bytes=1048576 cannot hold"):
        check_staging(msgspec.structs.replace(big, recv_buffer_bytes=1 << 20), geo, "kv_consumer")
    check_staging(big, geo, "kv_both")                     # 8 MiB pieces fit the 64 MiB defaults
    with pytest.raises(ConfigError, match=r"index_bytes=65536 cannot hold the piece index"):
        check_staging(SplitZipConfig(index_bytes=1 << 16, piece_tokens=16),
                      ModelGeometry(4096, 8, 128, 16), "prefill")
    # nothing to stage: raw-only prefill, and non-BF16 KV (moved raw) are not checked
    check_staging(SplitZipConfig(piece_tokens=1 << 18, compression="never"), geo, "kv_producer")
    fp16 = ModelGeometry(32, 8, 128, 16, dtype=torch.float16)
    check_staging(SplitZipConfig(piece_tokens=1 << 18), fp16, "kv_both")


def test_every_setting_is_in_the_settings_table_with_its_default():
    head, rows = _table("key", "default")
    documented = {}
    for row in rows:
        cell = dict(zip(head, row))
        for key in re.findall(r"`([a-z_0-9]+)`", cell["key"]):
            documented[key] = cell
    fields = SplitZipConfig.__struct_fields__
    missing = [f for f in fields if f not in documented]
    assert not missing, f"SplitZipConfig fields missing from docs/DEPLOYMENT.md's settings table: {missing}"
    unknown = [k for k in documented if k not in fields]
    assert not unknown, f"settings table documents keys SplitZipConfig does not have: {unknown}"
    defaults = msgspec.to_builtins(SplitZipConfig())
    for f in fields:
        m = re.match(r"^`([^`]*)`", documented[f]["default"])
        assert m, f"default of {f} is not a JSON literal in backticks: {documented[f]['default']!r}"
        assert json.loads(m.group(1)) == defaults[f], (f, m.group(1), defaults[f])


def test_readme_settings_point_to_the_deployment_table():
    readme = (DOC.parents[1] / "README.md").read_text()
    section = readme.split("### Settings", 1)[1].split("\n### ", 1)[0]
    assert "docs/DEPLOYMENT.md" in section
    assert "¼ of the KV cache" not in section
    for f in SplitZipConfig.__struct_fields__:
        assert f"`{f}`" in section, f"README's settings section does not mention {f}"
