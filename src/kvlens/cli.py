"""The ``kvlens`` command: ``generate``, ``chat``, ``info`` and ``pictures``.

Exit status: 0 on success, also when the reader of the output goes away (``kvlens ... | head``);
2 with one line on stderr for bad input or a failed read or write (naming the file); 130 on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from kvlens.cache import KeyValueCache
    from kvlens.model import HookedTransformer

log = logging.getLogger("kvlens")


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="a known model name, a Hugging Face checkpoint folder or a .gguf file "
        "(default: smollm2-135m-instruct)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars while loading")
    p.add_argument(
        "--quantized",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compute on a GGUF file's own 4- and 8-bit blocks (default for GGUF models; "
        "--no-quantized loads fp32 weights)",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 (default) is greedy; try 0.7 to sample"
    )
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvlens", description="Run causal language models with hooks and a fast KV cache."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue a prompt, streaming the text")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument(
        "--cache",
        default=None,
        metavar="FILE",
        help="continue after a saved cache (see --save-cache): the prompt follows its tokens",
    )
    gen.add_argument(
        "--save-cache",
        default=None,
        metavar="FILE",
        help="save the cache after the prompt's prefill (e.g. a document to ask about later; "
        "use --max-new-tokens 0 to only save)",
    )
    _add_model_args(gen)
    _add_sampling_args(gen)

    chat = sub.add_parser("chat", help="interactive chat; /reset forgets, /exit quits")
    chat.add_argument("--system", default=None, help="a system prompt")
    _add_model_args(chat)
    _add_sampling_args(chat)

    info = sub.add_parser("info", help="print the model's config and its cache's size per token")
    _add_model_args(info)

    pics = sub.add_parser(
        "pictures",
        help="write PNGs of attention patterns and the logit lens over a prompt (+ continuation)",
    )
    pics.add_argument("--prompt", required=True, help="the prompt text")
    pics.add_argument(
        "--max-new-tokens", type=int, default=0, help="greedy tokens to add first (default 0)"
    )
    pics.add_argument(
        "--layers", default="0", help="attention layers: comma-separated, or 'all' (default 0)"
    )
    pics.add_argument(
        "--heads", default="0", help="attention heads: comma-separated, or 'all' (default 0)"
    )
    pics.add_argument("--out", default=".", metavar="DIR", help="folder to write into (default .)")
    _add_model_args(pics)
    return parser


def _check_sampling(args: argparse.Namespace, least_new_tokens: int = 0) -> None:
    """Refuse sampling options out of range; ``least_new_tokens`` is 1 where 0 means nothing."""
    if args.max_new_tokens < least_new_tokens:
        raise CLIError(
            f"--max-new-tokens must be >= {least_new_tokens}"
            f"{' in chat' if least_new_tokens else ''}, got {args.max_new_tokens}"
        )
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise CLIError(f"--top-k must be >= 1, got {args.top_k}")


def _load(args: argparse.Namespace) -> HookedTransformer:
    from kvlens.model import HookedTransformer

    quantized = args.quantized
    if quantized is None:  # GGUF models run on their blocks unless told otherwise
        from kvlens.loading.pretrained import is_gguf_model

        quantized = is_gguf_model(args.model, progress=not args.quiet)
    return HookedTransformer.from_pretrained(
        args.model, progress=not args.quiet, quantized=quantized
    )


def cmd_generate(args: argparse.Namespace) -> None:
    _check_sampling(args)
    if not args.prompt:
        raise CLIError("the prompt is empty")
    from kvlens.tokens import stream_decode

    model = _load(args)
    prompt = args.prompt
    if args.chat:
        if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
            raise CLIError("--chat needs a model whose tokenizer has a chat template")
        messages = [{"role": "user", "content": prompt}]
        prompt = model.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    prompt_tokens, past_kv_cache = _cached_prompt(model, prompt, args)
    if not args.chat:  # echoed once the cache is read and saved: a failure leaves stdout empty
        sys.stdout.write(prompt)
    stream = model.generate_stream(
        prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        past_kv_cache=past_kv_cache,
        do_sample=args.temperature > 0,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    for piece in stream_decode(model.tokenizer, (int(t[0]) for t in stream)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _cached_prompt(
    model: HookedTransformer, prompt: str, args: argparse.Namespace
) -> tuple[Any, KeyValueCache | None]:
    """The tokens to generate from and the cache they continue (``--cache``/``--save-cache``)."""
    from kvlens.cache import KeyValueCache

    cache = None
    if args.cache is not None:
        cache = KeyValueCache.load(args.cache, model)
        if cache.batch_size != 1:
            raise CLIError(f"--cache {args.cache} holds {cache.batch_size} rows; expected 1")
    # After a cache the prompt continues its text: no BOS in the middle.
    tokens = model.to_tokens(
        prompt, prepend_bos=False if cache is not None else None, truncate=False
    )
    if args.save_cache is None:
        return tokens, cache
    cache = model.prefill(tokens) if cache is None else _extend(model, cache, tokens)
    cache.save(args.save_cache)
    log.info("saved the cache of %d tokens to %s", cache.seq_len, args.save_cache)
    # Generation re-reads the last prompt token so that it has its logits: drop it from the cache.
    return tokens[:, -1:], cache.crop(-1)


def _extend(model: HookedTransformer, cache: KeyValueCache, tokens: Any) -> KeyValueCache:
    """Run ``tokens`` into ``cache`` (the pass extends its token record)."""
    import torch

    # The prompt's tokens are all real (a pad id in it is text, not padding).
    model(tokens, return_type=None, past_kv_cache=cache, attention_mask=torch.ones_like(tokens))
    return cache


def cmd_chat(args: argparse.Namespace) -> None:
    _check_sampling(args, least_new_tokens=1)  # an answer of 0 tokens is no chat
    from kvlens.chat import ChatSession
    from kvlens.sampling import SamplingConfig

    model = _load(args)
    sampling = SamplingConfig(
        do_sample=args.temperature > 0,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    session = ChatSession(model, args.system, sampling, args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print("kvlens chat: /reset forgets the conversation, /exit quits.", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            break
        if message == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        try:
            for piece in session.send(message, args.max_new_tokens):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ValueError as e:
            print(f"kvlens: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()


def cmd_info(args: argparse.Namespace) -> None:
    model = _load(args)
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters()) + sum(
        rows * cols for rows, cols in (m.shape for m in model.quantized_weights.values())
    )
    print(f"model: {cfg.model_name} ({cfg.original_architecture or 'custom'})")
    for key, value in cfg.to_dict().items():
        print(f"  {key}: {value}")
    print(f"parameters: {n_params:,}")
    if model.is_quantized:
        print("quantized weights:")
        for line in model.quantization_summary():
            print(f"  {line}")
    else:
        print("quantized weights: none (fp32)")
    print(f"kv cache bytes per token: {cfg.kv_bytes_per_token:,} (batch row, all layers)")
    print(
        f"kv cache at full context ({cfg.n_ctx} tokens): "
        f"{cfg.kv_bytes_per_token * cfg.n_ctx / 2**20:.1f} MiB per batch row"
    )
    from kvlens import kernels  # imported here, as the model is: `kvlens --help` stays fast
    from kvlens.components.block import TransformerBlock

    print(f"native decode kernels: {kernels.describe()}")
    if kernels.available():
        reasons: list[str | None] = [
            cast(TransformerBlock, block).decode_plan_reason for block in model.blocks
        ]
        fused = sum(reason is None for reason in reasons)
        print(f"fused decode layer: {fused} of {len(reasons)} blocks")
        for reason in sorted({r for r in reasons if r is not None}):
            print(f"  op by op: {reason}")


def _indices(option: str, text: str) -> list[int] | None:
    """``"0,3"`` as ``[0, 3]``; ``"all"`` as ``None``; anything else refused naming ``option``."""
    if text.strip() == "all":
        return None
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise CLIError(f"{option} takes comma-separated numbers or 'all', got {text!r}") from None
    return list(dict.fromkeys(values))  # in the order given, each once


def cmd_pictures(args: argparse.Namespace) -> None:
    if not args.prompt:
        raise CLIError("the prompt is empty")
    if args.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    layers = _indices("--layers", args.layers)
    heads = _indices("--heads", args.heads)
    from kvlens import pictures

    model = _load(args)
    layers = list(range(model.cfg.n_layers)) if layers is None else layers
    heads = list(range(model.cfg.n_heads)) if heads is None else heads
    for option, checked in (("--layers", (layers, [])), ("--heads", ([], heads))):
        try:
            pictures.check_layers_heads(model, *checked)
        except ValueError as e:
            raise CLIError(f"{option}: {e}") from None
    paths = pictures.draw_pictures(
        model, args.prompt, args.out, layers, heads, max_new_tokens=args.max_new_tokens
    )
    for path in paths:
        print(path)


COMMANDS = {
    "generate": cmd_generate,
    "chat": cmd_chat,
    "info": cmd_info,
    "pictures": cmd_pictures,
}


def _describe(error: OSError) -> str:
    """One line for an I/O error, naming its file once."""
    text = error.strerror or str(error)
    if error.filename is not None and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return text


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush into a closed pipe is quiet."""
    try:
        fileno = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (io.UnsupportedOperation)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fileno)
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvlens`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="kvlens: %(message)s")
    try:
        COMMANDS[args.command](args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
    except BrokenPipeError:
        # The reader closed the pipe (`| head`): it has all it wanted; end quietly.
        _silence_stdout()
        return 0
    except OSError as e:
        print(f"kvlens: error: {_describe(e)}", file=sys.stderr)
        return 2
    except (CLIError, ValueError, ImportError) as e:
        print(f"kvlens: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
