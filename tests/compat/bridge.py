"""Build a TransformerLens 2.18 ``HookedTransformer`` holding a kvlens model's weights.

The compat tests run the same calls on both models, so the TL model must compute the same function:
the config maps field by field, and every TL parameter is filled from kvlens's TL-shaped views
(``attn.W_Q``, ``mlp.W_gate``, ...) with its shape asserted. TL's weight processing (``fold_ln``,
``center_writing_weights``, ...) only runs in ``from_pretrained``; a model built from a config
computes with the weights exactly as given.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from kvlens.config import ModelConfig
from kvlens.model import HookedTransformer


def tl_config(cfg: ModelConfig) -> Any:
    """The ``HookedTransformerConfig`` of the same architecture as ``cfg``.

    Raises:
        ValueError: For a kvlens architecture TL 2.18 computes differently (a model without a
            final norm: TL always has ``ln_final``).
    """
    from transformer_lens import HookedTransformerConfig

    if not cfg.final_norm:
        raise ValueError(
            "final_norm=False has no TransformerLens equivalent (ln_final is always built)"
        )
    rotary = cfg.positional_embedding_type == "rotary"
    base = cfg.rotary_base
    return HookedTransformerConfig(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_ctx=cfg.n_ctx,
        d_head=cfg.d_head,
        n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp_resolved,
        d_vocab=cfg.d_vocab,
        act_fn=cfg.act_fn,
        eps=cfg.eps,
        normalization_type=cfg.normalization_type,
        positional_embedding_type=cfg.positional_embedding_type,
        rotary_dim=cfg.rotary_dim_resolved if rotary else None,
        rotary_base=int(base) if float(base).is_integer() else base,
        rotary_adjacent_pairs=cfg.rotary_adjacent_pairs,
        gated_mlp=cfg.gated_mlp,
        parallel_attn_mlp=cfg.parallel_attn_mlp,
        n_key_value_heads=cfg.n_key_value_heads,
        original_architecture=cfg.original_architecture,
        default_prepend_bos=cfg.default_prepend_bos,
        use_attn_scale=True,  # kvlens always scales scores by d_head ** -0.5
        dtype=cfg.dtype,
        device="cpu",
        model_name=cfg.model_name,
        init_weights=False,  # every parameter is copied from kvlens below
    )


def tl_state_dict(model: HookedTransformer, tl_model: Any) -> dict[str, Tensor]:
    """kvlens's weights under TL's names: a full ``state_dict`` for ``tl_model``.

    Every TL parameter is filled and its shape checked. TL always has attention, MLP and
    unembedding biases: they are zero where kvlens has none. TL's buffers (causal mask, rotary
    tables) are kept as ``tl_model`` made them.
    """
    cfg = model.cfg
    if cfg.gated_mlp and cfg.mlp_bias:
        # TL's gated MLP adds b_in after the product and has no gate bias; kvlens's adds both
        # before it. Without biases the two agree.
        raise ValueError("a gated MLP with biases computes differently in TransformerLens")
    grouped = cfg.n_key_value_heads is not None
    k_name, v_name = ("_W_K", "_W_V") if grouped else ("W_K", "W_V")
    bk_name, bv_name = ("_b_K", "_b_V") if grouped else ("b_K", "b_V")
    out: dict[str, Tensor | None] = {"embed.W_E": model.embed.W_E}
    if cfg.positional_embedding_type == "standard":
        out["pos_embed.W_pos"] = model.pos_embed.W_pos
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        for norm in ("ln1", "ln2"):
            out[p + f"{norm}.w"] = getattr(block, norm).w
            if cfg.normalization_type == "LN":
                out[p + f"{norm}.b"] = getattr(block, norm).b
        attn = block.attn
        out |= {
            p + "attn.W_Q": attn.W_Q,
            p + f"attn.{k_name}": attn._W_K,
            p + f"attn.{v_name}": attn._W_V,
            p + "attn.W_O": attn.W_O,
            p + "attn.b_Q": attn.b_Q,
            p + f"attn.{bk_name}": attn._b_K,
            p + f"attn.{bv_name}": attn._b_V,
            p + "attn.b_O": attn.b_O,
            p + "mlp.W_in": block.mlp.W_in,
            p + "mlp.W_out": block.mlp.W_out,
            p + "mlp.b_in": block.mlp.b_in,
            p + "mlp.b_out": block.mlp.b_out,
        }
        if cfg.gated_mlp:
            out[p + "mlp.W_gate"] = block.mlp.W_gate
    out["ln_final.w"] = model.ln_final.w
    if cfg.normalization_type == "LN":
        out["ln_final.b"] = model.ln_final.b
    out["unembed.W_U"] = model.unembed.W_U
    out["unembed.b_U"] = model.unembed.b_U

    template = tl_model.state_dict()
    unfilled = sorted(name for name, _ in tl_model.named_parameters() if name not in out)
    if unfilled:
        raise KeyError(f"no kvlens weight for TransformerLens parameters {unfilled}")
    result = dict(template)
    for name, value in out.items():
        if name not in template:
            raise KeyError(f"TransformerLens has no parameter {name!r}")
        want = template[name]
        got = torch.zeros_like(want) if value is None else value.detach().clone()
        if got.shape != want.shape:
            raise ValueError(
                f"{name}: kvlens gives shape {tuple(got.shape)}, TL expects {tuple(want.shape)}"
            )
        result[name] = got.to(want.dtype).contiguous()
    return result


def to_transformer_lens(
    model: HookedTransformer,
    tokenizer: Any = None,
    default_padding_side: str = "right",
) -> Any:
    """A TL ``HookedTransformer`` computing what ``model`` computes, in eval mode.

    Args:
        model: The kvlens model whose weights are copied (it is not changed).
        tokenizer: Given to TL as a copy: TL's ``set_tokenizer`` changes the object it gets
            (``padding_side``) and, unless the tokenizer says ``add_bos_token``, reloads it by
            name with ``AutoTokenizer.from_pretrained`` (and needs ``init_kwargs["name_or_path"]``
            to try), which an in-memory tokenizer cannot do.
        default_padding_side: TL's padding side (TL sets it on its tokenizer copy).
    """
    from transformer_lens import HookedTransformer as TLHookedTransformer

    tl_tokenizer = None
    if tokenizer is not None:
        tl_tokenizer = copy.deepcopy(tokenizer)
        tl_tokenizer.init_kwargs["add_bos_token"] = True
        tl_tokenizer.init_kwargs.setdefault("name_or_path", tokenizer.name_or_path)
    tl_model = TLHookedTransformer(
        tl_config(model.cfg),
        tokenizer=tl_tokenizer,
        default_padding_side=default_padding_side,
    )
    weights = tl_state_dict(model, tl_model)
    tl_model.load_state_dict(weights, strict=True)
    return tl_model.eval()
