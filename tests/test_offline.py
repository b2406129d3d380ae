"""Offline use with vllm.LLM through vllm_steer.offline.steered_llm gives what the server gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_serving import PROMPTS, complete

CASES = [None, {"steer_alpha": 5}, {"steer_alpha": -5, "steer_beta": 3}, {"steer_beta": [2]}]

# vLLM starts its engine in a spawned process, so the offline script needs a __main__ guard.
SCRIPT = """
import json, sys
from vllm import SamplingParams
from vllm_steer import steer_args
from vllm_steer.offline import steered_llm

if __name__ == "__main__":
    model, steers, prompts, cases = json.loads(sys.argv[1])
    llm = steered_llm(model, steers, dtype="float32", max_model_len=1024, gpu_memory_utilization=0.5, seed=0)
    params = [SamplingParams(max_tokens=12, temperature=0,
                             extra_args=steer_args(**{k[6:]: v for k, v in case.items()}) if case else None)
              for case in cases]
    jobs = [(p, sp) for p in prompts for sp in params]
    outs = llm.generate([p for p, _ in jobs], [sp for _, sp in jobs], use_tqdm=False)
    print("RESULT" + json.dumps([o.outputs[0].text for o in outs]))
"""


def test_offline_llm_matches_server(servers, model_dir, steer_paths, tmp_path):
    script = tmp_path / "offline.py"
    script.write_text(SCRIPT)
    arg = json.dumps([str(model_dir), steer_paths, PROMPTS, CASES])
    run = subprocess.run([sys.executable, str(script), arg], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, cwd=tmp_path)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert run.returncode == 0 and lines, run.stderr[-5000:]
    offline = json.loads(lines[0][len("RESULT"):])
    served = [complete(servers["steer"], p, case, max_tokens=12).choices[0].text for p in PROMPTS for case in CASES]
    assert offline == served
    assert len({offline[i] for i in range(len(CASES))}) == len(CASES)  # each value steers differently
