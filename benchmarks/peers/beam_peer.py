"""Hugging Face beam search on a random SmolLM2-shaped model, for ``bench_cache_ops.py``.

Runs in the peers' virtual environment (``.peer-venv``), never in kvlens's. Prints one JSON line:
the median seconds of ``generate(num_beams=..., do_sample=False)`` over the repeats.

Usage::

    .peer-venv/bin/python benchmarks/peers/beam_peer.py '<JSON spec>'
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from importlib.metadata import version

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main(spec: dict) -> dict:
    shape = spec["shape"]
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    config = LlamaConfig(
        vocab_size=shape["d_vocab"],
        hidden_size=shape["d_model"],
        intermediate_size=shape["d_mlp"],
        num_hidden_layers=shape["n_layers"],
        num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_key_value_heads"],
        max_position_embeddings=shape["n_ctx"],
        rope_theta=shape["rotary_base"],
        rms_norm_eps=shape["eps"],
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    prompt = torch.randint(0, shape["d_vocab"], (1, spec["prompt_len"]))
    times = []
    for _ in range(spec["warmup"] + spec["repeats"]):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                num_beams=spec["num_beams"],
                do_sample=False,
                max_new_tokens=spec["new_tokens"],
            )
        times.append(time.perf_counter() - start)
    assert out.shape[1] == spec["prompt_len"] + spec["new_tokens"], out.shape
    return {
        "system": f"transformers {version('transformers')}",
        "seconds": statistics.median(times[spec["warmup"] :]),
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
