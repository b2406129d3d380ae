"""Offline use with vllm.LLM through vllm_steer.steered_llm gives what the server gives,
and the dense form of high-rank steers gives what the factored form gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from helpers import PROMPTS, complete

from vllm_steer import SteerFile

CASES = [None, {"steer_alpha": 5}, {"steer_alpha": -5, "steer_beta": 3}, {"steer_beta": [2]}]

# vLLM starts its engine in a spawned process, so the offline script needs a __main__ guard.
SCRIPT = """
import json, sys
from vllm import SamplingParams
from vllm_steer import steer_args, steered_llm

if __name__ == "__main__":
    model, steers, prompts, cases = json.loads(sys.argv[1])
    llm = steered_llm(model, steers, dtype="float32", max_model_len=1024, gpu_memory_utilization=0.5, seed=0,
                      enforce_eager=True)  # as the session's servers
    params = [SamplingParams(max_tokens=12, temperature=0,
                             extra_args=steer_args(**{k[6:]: v for k, v in case.items()}) if case else None)
              for case in cases]
    jobs = [(p, sp) for p in prompts for sp in params]
    outs = llm.generate([p for p, _ in jobs], [sp for _, sp in jobs], use_tqdm=False)
    print("RESULT" + json.dumps([o.outputs[0].text for o in outs]))
"""


def zero_padded(path: str, rank: int, out: str) -> str:
    """The same steer written at a higher rank: P1 and P2 padded with zero columns, so every
    W_k = P1_k P2_k^T, and so the steer, is unchanged."""
    steer = SteerFile.load(path)
    k, d, r = steer.projector1.shape
    pad = torch.zeros(k, d, rank - r)
    h = steer.header
    SteerFile.create(torch.cat([steer.projector1.float(), pad], 2), torch.cat([steer.projector2.float(), pad], 2),
                     dim_names=h.dim_names, epsilon=h.epsilon, primary_dim=h.primary_dim, bias_dims=h.bias_dims,
                     base_model=h.base_model, fingerprint=h.fingerprint).save(out)
    return out


def test_offline_llm_matches_server(servers, model_dir, steer_paths, tmp_path):
    """The offline engine loads the session's steers zero-padded to rank 1000 (> D = 576, as a
    reference checkpoint can be): the plugin then applies them on CPU through the dense
    W_k (one GEMM) while the server uses the rank-64/32 factors (two GEMMs). Same texts."""
    script = tmp_path / "offline.py"
    script.write_text(SCRIPT)
    padded = {name: zero_padded(path, 1000, str(tmp_path / f"{name}.safetensors"))
              for name, path in steer_paths.items()}
    arg = json.dumps([str(model_dir), padded, PROMPTS, CASES])
    run = subprocess.run([sys.executable, str(script), arg], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, cwd=tmp_path)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert run.returncode == 0 and lines, run.stderr[-5000:]
    assert "dense W_k, one GEMM each" in run.stdout + run.stderr
    offline = json.loads(lines[0][len("RESULT"):])
    served = [complete(servers["steer"], p, case, max_tokens=12).choices[0].text for p in PROMPTS for case in CASES]
    assert offline == served
    assert len({offline[i] for i in range(len(CASES))}) == len(CASES)  # each value steers differently
