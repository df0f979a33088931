"""Load on the real server (SmolLM2): 200 mixed requests, 32 at a time — chat and completions, streamed and not,
n = 1-3, stop strings, json_schema / json_object, forced tool calls — through bench/soak.py (one round of its mix).
Every request must succeed and the KV cache must be empty afterwards."""
from __future__ import annotations

import json
import subprocess
import sys

from .conftest import REPO
from .server_utils import ServerProcess, free_port, wait_idle


def test_200_mixed_requests_at_concurrency_32(smollm_q4, tmp_path):
    server = ServerProcess([str(smollm_q4.dir), "--model-lib", str(smollm_q4.lib), "--device", "cpu", "--mode",
                            "server", "--overrides", "max_num_sequence=8;max_total_seq_length=4096"], free_port(),
                           tmp_path / "server.log")
    try:
        server.wait_health()
        out = tmp_path / "soak.json"
        run = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--url", server.url, "--pid",
                              str(server.proc.pid), "--rounds", "1", "--warmup-rounds", "0",
                              "--requests-per-round", "200", "--concurrency", "32", "--max-growth", "1000",
                              "--json-out", str(out)], capture_output=True, text=True, timeout=1200)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        result = json.loads(out.read_text())
        assert result["summary"]["errors"] == 0 and result["summary"]["requests"] == 200
        assert result["rounds"][0]["kv_cache_usage"] == 0.0
        idle = wait_idle(server)
        assert idle["mlc_llm:kv_cache_usage_perc"] == 0.0
        assert idle['mlc_llm:request_success_total'] >= 200
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    assert "Traceback" not in server.log(), server.log()[-3000:]
