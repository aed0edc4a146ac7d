"""Host memory peak of converting a LLaMA-7B-shaped HF checkpoint (random weights, bf16, sharded safetensors).

    python bench/convert_memory.py --workdir /tmp/llama7b [--layers 32]

Step 1 (a child process) builds ``transformers.LlamaForCausalLM`` with LLaMA-7B's config in bf16 and writes it with
``save_pretrained`` (5 GB shards + index). Step 2 runs ``python -m convert.hf_llama`` on it in another child process
(params kept bf16) and reports that process's peak resident memory (``ru_maxrss``) against the checkpoint's size.
Needs the torch extra and ~30 GB of free disk.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

BUILD = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers={layers},
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)
torch.set_default_dtype(torch.bfloat16)
with torch.no_grad():
    model = LlamaForCausalLM(cfg)
model.save_pretrained(sys.argv[1], max_shard_size="5GB")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/llama7b")
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    work = Path(args.workdir)
    src, dst = work / "hf", work / "g4v"
    if not (src / "model.safetensors.index.json").is_file():
        t0 = time.time()
        subprocess.run([sys.executable, "-c", BUILD.format(layers=args.layers), str(src)], check=True)
        print(f"wrote random HF checkpoint to {src} in {time.time() - t0:.0f}s")
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "convert.hf_llama", str(src), str(dst), "model.param_dtype=bfloat16",
                    "model.compute_dtype=bfloat16"], check=True, cwd=Path(__file__).resolve().parents[1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    result = {"layers": args.layers, "checkpoint_gib": size / 2**30, "peak_rss_gib": peak / 2**30,
              "ratio": peak / size, "seconds": time.time() - t0}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
