"""Benchmarks of the cache as an object: save/load, beam search, speculative decoding.

Three measurements, on CPU in fp32, results in ``benchmarks/results/cache_ops.json``:

- save and load time and file size of a 2,048-token cache of SmolLM2-135M's shape (batch 1);
- beam search (4 beams) tokens per second, kvlens against Hugging Face's ``generate`` (run in the
  peers' virtual environment by ``peers/beam_peer.py``) on a random SmolLM2-shaped model;
- greedy speculative decoding on SmolLM2-135M's real weights: the speed-up over plain greedy
  decoding and the acceptance rate, with the model drafting for itself (an upper bound on the
  acceptance rate; the speed-up is expected below 1, since the draft costs as much as the target)
  and with a random 2-layer draft of the same vocabulary (acceptance near 0, the lower bound).

Usage::

    .venv/bin/python benchmarks/bench_cache_ops.py            # full run
    .venv/bin/python benchmarks/bench_cache_ops.py --quick    # small settings, to check it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvlens import HookedTransformer, KeyValueCache, ModelConfig
from kvlens.speculative import SpeculativeStats
from model_shapes import SHAPES

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".peer-venv" / "bin" / "python"
RESULTS = ROOT / "benchmarks" / "results" / "cache_ops.json"


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def smollm2_cfg() -> ModelConfig:
    return ModelConfig(**SHAPES["smollm2-135m"], model_name="smollm2-shaped-random")


def bench_save_load(tokens: int, repeats: int) -> dict[str, Any]:
    cfg = smollm2_cfg()
    cache = KeyValueCache.init_cache(cfg, "cpu", batch_size=1, capacity=tokens)
    for entry in cache.entries:
        shape = (1, tokens, cfg.n_kv_heads, cfg.d_head)
        entry.append(torch.randn(shape), torch.randn(shape))
    cache.append_attention_mask(torch.ones(1, tokens, dtype=torch.long))
    cache.tokens = torch.randint(0, cfg.d_vocab, (1, tokens))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cache.safetensors"
        save = median_seconds(lambda: cache.save(path), repeats)
        load = median_seconds(lambda: KeyValueCache.load(path, cfg), repeats)
        size = path.stat().st_size
    return {
        "tokens": tokens,
        "save_s": save,
        "load_s": load,
        "file_bytes": size,
        "cache_bytes_used": cache.nbytes_used,
    }


def bench_beam(prompt_len: int, new_tokens: int, repeats: int, threads: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = HookedTransformer(smollm2_cfg()).eval()
    prompt = torch.randint(0, model.cfg.d_vocab, (1, prompt_len))

    def run() -> None:
        out = model.generate(
            prompt,
            max_new_tokens=new_tokens,
            do_sample=False,
            stop_at_eos=False,
            num_beams=4,
            verbose=False,
        )
        assert out.shape[1] == prompt_len + new_tokens

    kvlens_s = median_seconds(run, repeats)
    result: dict[str, Any] = {
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "num_beams": 4,
        "kvlens_tokens_per_s": new_tokens / kvlens_s,
    }
    if PEER_PYTHON.exists():
        spec = {
            "shape": SHAPES["smollm2-135m"],
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "num_beams": 4,
            "repeats": repeats,
            "warmup": 1,
            "threads": threads,
        }
        peer = subprocess.run(
            [str(PEER_PYTHON), str(ROOT / "benchmarks/peers/beam_peer.py"), json.dumps(spec)],
            check=True,
            capture_output=True,
            text=True,
        )
        hf = json.loads(peer.stdout.strip().splitlines()[-1])
        result["hf_system"] = hf["system"]
        result["hf_tokens_per_s"] = new_tokens / hf["seconds"]
    return result


def bench_speculative(new_tokens: int, k: int, repeats: int) -> dict[str, Any]:
    target = HookedTransformer.from_pretrained(progress=False)
    prompt = target.to_tokens("The history of the printing press begins")
    torch.manual_seed(0)
    small = ModelConfig(**{**SHAPES["smollm2-135m"], "n_layers": 2}, model_name="random-draft")
    drafts = {"self": target, "random-2-layer": HookedTransformer(small).eval()}

    def greedy(**kwargs: Any) -> Any:
        return target.generate(
            prompt,
            max_new_tokens=new_tokens,
            do_sample=False,
            stop_at_eos=False,
            verbose=False,
            **kwargs,
        )

    expected = greedy()
    plain_s = median_seconds(greedy, repeats)
    result: dict[str, Any] = {"new_tokens": new_tokens, "k": k, "plain_greedy_s": plain_s}
    for name, draft in drafts.items():
        stats = SpeculativeStats()
        assert torch.equal(greedy(draft_model=draft, num_speculative_tokens=k), expected)
        greedy(draft_model=draft, num_speculative_tokens=k, speculative_stats=stats)
        seconds = median_seconds(
            lambda d=draft: greedy(draft_model=d, num_speculative_tokens=k), repeats
        )
        result[name] = {
            "seconds": seconds,
            "speed_up": plain_s / seconds,
            "acceptance_rate": stats.acceptance_rate,
            "tokens_per_target_pass": stats.tokens_per_round,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings, to check it runs")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quick = args.quick
    results = {
        "device": "cpu",
        "threads": args.threads,
        "torch": torch.__version__,
        "save_load": bench_save_load(128 if quick else 2048, 1 if quick else 5),
        "beam_search": bench_beam(
            8 if quick else 128, 4 if quick else 64, 1 if quick else 3, args.threads
        ),
        "speculative": bench_speculative(8 if quick else 64, 4, 1 if quick else 3),
    }
    text = json.dumps(results, indent=2)
    print(text)
    if not quick:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
