"""tools/score_logprobs.py under torchrun: HF -> Megatron checkpoint -> TP2PP2 scoring == transformers."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.hf_tiny import save_hf_model

pytestmark = pytest.mark.distributed
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.parametrize("family", ["qwen3"])
def test_score_logprobs_tool_matches_transformers_at_tp2pp2(tmp_path, family):
    hf_dir = save_hf_model(family, tmp_path / "hf", num_hidden_layers=4)
    ckpt = tmp_path / "megatron"
    _run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-path", str(hf_dir), "--save", str(ckpt), "--quiet"])
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 301, (int(n),), generator=g).tolist() for n in torch.randint(3, 60, (7,), generator=g)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in seqs))
    out = tmp_path / "out.jsonl"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
          "tools/score_logprobs.py", "--load", str(ckpt), "--tp", "2", "--pp", "2",
          "--input", str(inp), "--output", str(out), "--token-budget", "64"])
    got = [json.loads(line)["logprobs"] for line in out.read_text().splitlines()]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert len(got) == len(seqs)
    with torch.no_grad():
        for s, lp in zip(seqs, got):
            ids = torch.tensor([s])
            ref = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            assert len(lp) == len(s) - 1
            assert (torch.tensor(lp, dtype=torch.float64) - ref).abs().max().item() <= 1e-4


def test_score_logprobs_tool_refuses_bad_input(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"input_ids": [1]}\n')
    hf_dir = save_hf_model("llama", tmp_path / "hf")
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "tools/score_logprobs.py", "--load", str(hf_dir), "--input",
                          str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "input_ids must be a list of >= 2" in res.stderr
