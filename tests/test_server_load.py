"""Load on the real server (SmolLM2): 200 mixed requests, 32 at a time — chat and completions, streamed and not,
n = 1-3, stop strings, json_schema / json_object, forced tool calls — through bench/soak.py (one round of its mix):
every request succeeds and the KV cache is empty afterwards; and 64 concurrent greedy streams, each identical to the
same request alone."""
from __future__ import annotations

import json
import re
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


def test_64_concurrent_greedy_streams_each_match_the_request_alone(smollm_q4, tmp_path):
    import threading

    import requests

    server = ServerProcess([str(smollm_q4.dir), "--model-lib", str(smollm_q4.lib), "--device", "cpu", "--mode",
                            "server", "--overrides", "max_num_sequence=64;max_total_seq_length=8192"], free_port(),
                           tmp_path / "server.log")
    prompts = ["The capital of France is", "One, two, three,", "def add(a, b):", "The sky is",
               "My favourite food is", "Water boils at", "The first president of the United States was", "Cats and"]

    def body(p, stream):
        return {"prompt": p, "max_tokens": 16, "temperature": 0, "stream": stream}

    try:
        server.wait_health()
        alone = {p: requests.post(server.url + "/v1/completions", json=body(p, False), timeout=120)
                 .json()["choices"][0]["text"] for p in prompts}
        got: list = [None] * 64

        def stream(i):
            text = []
            with requests.post(server.url + "/v1/completions", json=body(prompts[i % 8], True), stream=True,
                               timeout=300) as r:
                for line in r.iter_lines():
                    if line.startswith(b"data: {"):
                        text.append(json.loads(line[6:])["choices"][0]["text"])
            got[i] = "".join(text)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [g == alone[prompts[i % 8]] for i, g in enumerate(got)] == [True] * 64, got
        m = wait_idle(server)
        assert m["mlc_llm:kv_cache_usage_perc"] == 0.0
        sizes = [int(re.search(r'batch_size="(\d+)"', k).group(1)) for k, v in m.items()
                 if k.startswith("mlc_llm:decode_steps_by_batch_size_total{") and v > 0]
        assert max(sizes) >= 32, sizes  # they really ran together
    finally:
        assert server.stop() == 0, server.log()[-3000:]
