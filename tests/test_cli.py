"""The ``splitzip-vllm`` command line, run as ``python -m splitzip_vllm`` in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, check: bool | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("SPLITZIP_BACKEND", None)
    p = subprocess.run([sys.executable, "-m", "splitzip_vllm", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
    if check is True:
        assert p.returncode == 0, f"rc={p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def last_json(p: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in p.stdout.strip().splitlines() if ln.strip()]
    assert lines, f"no stdout; stderr:\n{p.stderr}"
    return json.loads(lines[-1])


def kv_like(shape, seed: int, scale: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ch = torch.exp(0.5 * torch.randn(shape[-1], generator=g))
    return (torch.randn(*shape, generator=g) * ch * scale).to(torch.bfloat16)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("cli")
    out = {}
    out["calib"] = d / "calib.safetensors"
    save_file({f"layer{i}.{kv}": kv_like((512, 8, 64), 10 * i + (kv == "v")) for i in range(2) for kv in "kv"},
              str(out["calib"]))
    out["eval"] = d / "eval.safetensors"
    save_file({f"layer{i}.{kv}": kv_like((512, 8, 64), 100 + 10 * i + (kv == "v")) for i in range(2)
               for kv in "kv"}, str(out["eval"]))
    out["pt"] = d / "kv.pt"
    torch.save({"k": [kv_like((300, 4, 64), 7), kv_like((1000, 4, 64), 8)], "meta": torch.arange(3),
                "v": kv_like((2048, 128), 9)}, str(out["pt"]))
    out["pt_tensor"] = d / "single.pt"
    torch.save(kv_like((4096, 64), 11), str(out["pt_tensor"]))
    out["f32"] = d / "f32.safetensors"
    save_file({"x": torch.randn(1000, 64)}, str(out["f32"]))
    out["not_tensors"] = d / "garbage.safetensors"
    out["not_tensors"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00this is not safetensors at all")
    return out


@pytest.fixture(scope="module")
def codebook_file(files, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cb") / "codebook.json"
    p = cli("calibrate", files["calib"], "-o", path, check=True)
    assert "coverage" in p.stdout and "entropy" in p.stdout and "expected ratio" in p.stdout
    return path


def test_version_and_help():
    p = cli("--version", check=True)
    assert "splitzip-vllm" in p.stdout
    p = cli("--help", check=True)
    for sub in ("calibrate", "roundtrip", "bench"):
        assert sub in p.stdout


def test_calibrate_writes_valid_codebook(codebook_file):
    from splitzip_vllm.codec import Codebook
    obj = json.loads(codebook_file.read_text())
    assert obj["format"] == "splitzip-codebook" and obj["version"] == 2 and obj["dtype"] == "bfloat16"
    assert obj["modes"] == ["exp4", "exp2l"]
    for key in ("coverage", "expected_ratio", "expected_ratio_exp4", "expected_ratio_exp2l", "entropy_bits",
                "samples"):
        assert key in obj, key
    assert obj["samples"] == 4 * 512 * 8 * 64
    assert 0.99 < obj["coverage"] <= 1.0
    assert 1.2 < obj["expected_ratio_exp4"] <= 2 / 1.5
    assert obj["expected_ratio"] == max(obj["expected_ratio_exp4"], obj["expected_ratio_exp2l"])
    assert 0 < obj["entropy_bits"] < 8
    cb = Codebook.load(codebook_file)
    assert 16 <= cb.n_codes <= 22 and list(cb.exponents) == obj["exponents"] and cb.two_level


def test_calibrate_top_k(files, tmp_path):
    path = tmp_path / "cb8.json"
    cli("calibrate", files["calib"], "-o", path, "--top", "8", check=True)
    assert len(json.loads(path.read_text())["exponents"]) == 8
    p = cli("calibrate", files["calib"], "-o", path, "--top", "23")
    assert p.returncode != 0 and "--top" in p.stderr


def test_calibrate_exp4_only(files, tmp_path):
    from splitzip_vllm.codec import Codebook
    path = tmp_path / "cb4.json"
    p = cli("calibrate", files["calib"], "-o", path, "--exp4-only", check=True)
    obj = json.loads(path.read_text())
    assert obj["modes"] == ["exp4"] and len(obj["exponents"]) <= 16 and "EXP2L" in p.stdout
    assert not Codebook.load(path).two_level


def test_roundtrip_json_with_codebook_file(files, codebook_file):
    p = cli("roundtrip", files["eval"], "--codebook", codebook_file, "--json", check=True)
    res = last_json(p)
    for key in ("ratio", "bitwise", "backend", "raw_bytes", "compressed_bytes", "escape_rate", "tensors",
                "codebook"):
        assert key in res, key
    assert res["bitwise"] is True
    assert res["ratio"] > 1.2
    assert res["tensors"] == 4
    assert res["raw_bytes"] == 4 * 512 * 8 * 64 * 2
    assert abs(res["ratio"] - res["raw_bytes"] / res["compressed_bytes"]) < 1e-12
    assert 0 <= res["escape_rate"] < 0.01
    assert res["codebook"] == str(codebook_file)
    from splitzip_vllm.codec import available_backends
    assert res["backend"] == available_backends("cpu")[0]


def test_roundtrip_auto_codebook_says_so(files):
    p = cli("roundtrip", files["eval"], check=True)
    assert "calibrated on the same files" in p.stdout + p.stderr
    assert "bitwise lossless: yes" in p.stdout


def test_roundtrip_every_backend_same_bytes(files, codebook_file):
    from splitzip_vllm.codec import available_backends
    results = {}
    for be in available_backends("cpu"):
        res = last_json(cli("roundtrip", files["eval"], "--codebook", codebook_file, "--backend", be, "--json",
                            check=True))
        assert res["backend"] == be and res["bitwise"] is True
        results[be] = res
    sizes = {(r["compressed_bytes"], r["escape_rate"]) for r in results.values()}
    assert len(sizes) == 1, results


def test_roundtrip_pt_files_and_chunk_log2(files, codebook_file):
    p = cli("roundtrip", files["pt"], files["pt_tensor"], "--codebook", codebook_file, "--chunk-log2", "8",
            "--json", check=True)
    res = last_json(p)
    assert res["bitwise"] is True and res["tensors"] == 4 and res["chunk_log2"] == 8
    assert "skipping 1 non-bfloat16" in p.stderr  # the int64 "meta" tensor


def test_roundtrip_codebook_none_is_raw(files):
    res = last_json(cli("roundtrip", files["eval"], "--codebook", "none", "--json", check=True))
    assert res["bitwise"] is True and res["raw_payloads"] == res["tensors"]
    assert res["ratio"] < 1.0  # 96 header bytes per RAW payload


def test_bench_runs(files, codebook_file):
    p = cli("bench", files["eval"], "--codebook", codebook_file, "--repeat", "1", "--backends", "reference",
            "memcpy", "zstd", "--json", check=True)
    assert "splitzip-reference" in p.stdout and "torch-memcpy" in p.stdout and "zstd-1" in p.stdout
    rows = last_json(p)["rows"]
    assert all(r["verified"] for r in rows)


# ---------------------------------------------------------------------------------------------------- errors

def test_missing_file(tmp_path):
    p = cli("roundtrip", tmp_path / "nope.safetensors", "--json")
    assert p.returncode != 0 and "no such file" in p.stderr and "nope.safetensors" in p.stderr
    assert "Traceback" not in p.stderr
    p = cli("calibrate", tmp_path / "nope.pt", "-o", tmp_path / "cb.json")
    assert p.returncode != 0 and "no such file" in p.stderr
    assert not (tmp_path / "cb.json").exists()


@pytest.mark.parametrize("content, words", [
    ("{not json", "cannot read codebook"),
    ('{"format": "something-else", "version": 1, "exponents": [126]}', "not a splitzip codebook"),
    ('{"format": "splitzip-codebook", "version": 7, "exponents": [126]}', "version"),
    ('{"format": "splitzip-codebook", "version": 1, "exponents": [126, 126]}', "distinct"),
    ('{"format": "splitzip-codebook", "version": 1, "exponents": [300]}', "0..255"),
    ('{"format": "splitzip-codebook", "version": 1, "exponents": []}', "1..22"),
])
def test_corrupted_codebook_file(files, tmp_path, content, words):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    p = cli("roundtrip", files["eval"], "--codebook", bad, "--json")
    assert p.returncode != 0
    assert "codebook" in p.stderr and words in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_missing_codebook_file(files, tmp_path):
    p = cli("roundtrip", files["eval"], "--codebook", tmp_path / "none.json")
    assert p.returncode != 0 and "cannot read codebook" in p.stderr


def test_non_bf16_file(files):
    p = cli("roundtrip", files["f32"])
    assert p.returncode != 0 and "no bfloat16 tensors" in p.stderr and "float32" in p.stderr
    p = cli("calibrate", files["f32"], "-o", "/tmp/never-written.json")
    assert p.returncode != 0 and "no bfloat16 tensors" in p.stderr


def test_unreadable_tensor_file(files):
    p = cli("roundtrip", files["not_tensors"])
    assert p.returncode != 0 and "cannot read" in p.stderr and "Traceback" not in p.stderr


def test_bad_arguments(files, tmp_path):
    p = cli("roundtrip", files["eval"], "--backend", "gpu-magic")
    assert p.returncode == 2 and "invalid choice" in p.stderr
    p = cli("roundtrip", files["eval"], "--chunk-log2", "20")
    assert p.returncode == 2
    p = cli("calibrate", "--model", "some/model", "-o", tmp_path / "cb.json")
    assert p.returncode == 2 and "some/model" in p.stderr and "Traceback" not in p.stderr
    p = cli("calibrate", "-o", tmp_path / "cb.json")
    assert p.returncode != 0 and "FILES" in p.stderr


def test_unavailable_backend(files):
    from splitzip_vllm.codec import available_backends
    missing = [b for b in ("cuda", "triton", "cpu") if b not in available_backends("cpu")]
    if not missing:
        pytest.skip("every backend is available here")
    p = cli("roundtrip", files["eval"], "--backend", missing[0])
    assert p.returncode != 0 and missing[0] in p.stderr and "Traceback" not in p.stderr
