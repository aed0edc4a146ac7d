"""``bench/run.py``: the GPU suite's code runs end to end on toy sizes on the CPU (``--tiny``), so the script a lent
GPU will run is never first tried on the GPU. The figures themselves are not judged here (timed tests on a shared
machine measure the machine); what is checked is that every row is there, both sides agree on the outputs, and the
tables and JSON are written."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_runs_on_toy_sizes(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--suite", "gpu", "--tiny", "--reps", "1",
                          "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    (result,) = json.loads((tmp_path / "r.json").read_text())
    assert result["suite"] == "gpu (tiny)" and result["dtype"] == "bfloat16"
    works = [r["work"] for r in result["rows"]]
    for expected in ("prefill", "greedy decode, batch 1", "greedy decode, batch 4", "engine:", "LoRA r16",
                     "remat dots", "CLIP ViT", "stage-1 step", "one video question"):
        assert any(expected in w for w in works), (expected, works)
    for r in result["rows"]:
        assert r["ours"] > 0 and (r["peer"] is None or r["peer"] > 0), r
        if "tokens_match" in r:  # greedy on the same bf16 weights: the same tokens at toy sizes
            assert r["tokens_match"] == 1.0, r
        if "requests_match" in r:
            assert r["requests_match"] == r["requests"], r
        if "first_loss" in r:  # the same weights and batch: the same loss before any update
            assert abs(r["first_loss"][0] - r["first_loss"][1]) < 0.05, r
        if "max_abs_logit_diff" in r:
            assert r["max_abs_logit_diff"] < 0.1, r
    table = (tmp_path / "r.md").read_text()
    assert table.count("\n| ") == len(works) + 1 and "ours/HF" in table


def test_t2v_bench_runs_on_tiny_pipelines(tmp_path):
    """``bench/t2v.py --tiny``: one row per text-to-video family asked for (two here: each row is a fresh process
    that imports torch; tests/t2v covers every family), our backend beside the bare diffusers call."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "t2v.py"), "--tiny", "--families", "ltx,wan", "--reps",
                          "1", "--setting", "steps=2", "--json", str(tmp_path / "t.json"), "--markdown",
                          str(tmp_path / "t.md")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [r["family"] for r in rows] == ["ltx", "wan"]
    for r in rows:
        assert r["steps"] == 2 and r["device"] == "cpu" and r["prompts"] == 2
        assert r["ours_s_per_video"] > 0 and r["peer_s_per_video"] > 0 and r["peak_gib"]["process_rss"] > 0
    ltx = next(r for r in rows if r["family"] == "ltx")
    assert ltx["video"] == "17x64x64"  # the tiny sizes obey each family's rules: nothing was rounded
    assert not any("->" in n for r in rows for n in r["notes"])
    assert (tmp_path / "t.md").read_text().count("\n| ") == len(rows)  # a line per row after the header



def test_multiturn_bench_runs_on_the_tiny_model(tmp_path):
    """``bench/multiturn.py --tiny``: conversations resent every turn through our engine with and without its caches
    and through transformers' continuous batching; the caches change no token and skip most of the prompt."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "multiturn.py"), "--tiny", "--users", "2", "--turns",
                          "3", "--answer", "4", "--json", str(tmp_path / "m.json")],
                         capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["conversations_identical"] == "2/2"
    on, off, peer = report["paths"]
    assert [p["path"] for p in report["paths"]] == ["ours, caches", "ours, no caches", "HF CB"]
    assert on["encoded_videos"] == 2 and off["encoded_videos"] == 6
    assert on["prefix_hit_tokens"] > on["prefill_tokens"] and off["prefix_hit_tokens"] == 0
    assert all(len(p["ttft_by_turn_s"]) == 3 and p["tokens_per_s"] > 0 for p in report["paths"])
    assert "TTFT on turns >= 3 with the caches" in out.stdout
