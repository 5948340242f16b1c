"""The soak of ``vlm serve`` (``vlm bench serve``; slow, run on demand with ``-m slow``): 2,000
requests from 50 concurrent clients against the tiny model, 10% of them bad: every good request
answered, every bad one a 4xx, resident memory at the end within 10% of after the first 100."""

from __future__ import annotations

import json

import pytest
from conftest import build_tiny_model, tiny_model_config
from test_hf_llava_interop import write_stage_output

from vlm.app.bench.serve_soak import soak_serve


@pytest.mark.slow
def test_soak_2000_requests_from_50_clients(tmp_path, tokenizer_dir, tokenizer):
    cfg = tiny_model_config(tokenizer_dir, template="chatml")
    checkpoint = write_stage_output(tmp_path / "tiny" / "final", build_tiny_model(cfg, tokenizer, seed=11), cfg,
                                    tokenizer)
    result = soak_serve(str(checkpoint), requests=2000, clients=50, bad_ratio=0.1, progress=False)
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}))
    assert result["good_answered"] == result["good"] > 1600
    assert result["bad_4xx"] == result["bad"] > 100, result["statuses"]
    assert abs(result["rss_growth"]) <= 0.10, result
    assert result["server_exit_code"] == 0


def test_a_short_soak_answers_the_good_and_refuses_the_bad(tmp_path, tokenizer_dir, tokenizer):
    # the same harness at 16 requests, a bad kind of each in them: the default run keeps it honest
    cfg = tiny_model_config(tokenizer_dir, template="chatml")
    checkpoint = write_stage_output(tmp_path / "tiny" / "final", build_tiny_model(cfg, tokenizer, seed=11), cfg,
                                    tokenizer)
    result = soak_serve(str(checkpoint), requests=16, clients=2, bad_ratio=0.5, warm_requests=4, progress=False)
    assert result["good_answered"] == result["good"] > 0
    assert result["bad_4xx"] == result["bad"] > 0, result["statuses"]
    assert len(result["statuses"]) == 8, result["statuses"]  # good and the 7 bad kinds
