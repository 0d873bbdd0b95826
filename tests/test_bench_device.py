"""scripts/bench_device.sh's Python part runs end to end with --smoke (tiny random shapes on CPU): every method row,
the projection from the assumed acceptance, the JSON."""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_device_smoke(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import bench_device
    finally:
        sys.path.pop(0)
    out = tmp_path / "bench_device.json"
    res = bench_device.main(["--smoke", "--repeats", "1", "--max-new-tokens", "6", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    got = {(r["method"], r["draft"]) for r in saved["rows"]}
    assert got == {("ar", None)} | {(m, d) for m in ("sd", "eft", "sss") for d in ("heads", "draft")}
    for r in saved["rows"]:
        assert r["new_tokens"] == 6 and r["tokens_per_s"] > 0
        if r["method"] in ("sd", "sss"):
            # projection: expected tokens per block at the assumed acceptance over the measured block time
            exp = (1 - r["alpha_assumed"] ** 5) / (1 - r["alpha_assumed"])
            assert abs(r["projected_tokens_per_s"] - exp / (r["block_ms"] / 1e3)) < 1e-6 * r["projected_tokens_per_s"]
    assert bench_device.expected_tokens(1.0, 4) == 5.0 and abs(bench_device.expected_tokens(0.5, 1) - 1.5) < 1e-12
