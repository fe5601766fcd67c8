"""Write a Qwen2 decoder as an ONNX graph with a static KV cache (onnxruntime GroupQueryAttention).

Usage::

    python export/generator_gqa.py --model HF_DIR --out DIR [--dtype fp32|fp16|int8]
        [--max-len N] [--logits]

Why a second exporter: onnxruntime CUDA graphs replay a recorded launch sequence, so every input
and output must keep its device address and shape from one decode step to the next. optimum's
decoder (``generator.py``) returns a ``present`` KV cache one position longer per step, which a
CUDA graph cannot capture. Here the graph is written node by node with ``onnx.helper`` from the
checkpoint's weights, around onnxruntime's ``com.microsoft.GroupQueryAttention`` (GQA) contrib op,
whose KV cache is a preallocated buffer of ``max_len`` positions that the op updates in place
(``past_key.{i}`` and ``present_key.{i}`` bound to the same memory).

Graph contract (``B`` rows, ``S`` new tokens per row in this call, ``L`` the buffer length):

* inputs ``input_ids (B, S) int64``; ``seqlens_k (B,) int32``: each row's valid length *after*
  this call, minus one (GQA's definition); ``total_sequence_length () int32``: the largest valid
  length after this call (``== S`` for a first prompt); ``last_index (B,) int64``: the position in
  this call's ``S`` tokens whose next token is returned; ``past_key.{i}``/``past_value.{i}``
  ``(B, kv_heads, L, head_dim)`` for each layer ``i``, ``L <= max_len``.
* outputs ``next_token (B,) int64`` (argmax of the logits at ``last_index``; first maximum, as
  ``torch.argmax``), ``logits (B, vocab)`` with ``--logits``, and ``present_key.{i}``/
  ``present_value.{i}``: the past buffers themselves (same shape), when bound to the same memory.

Padding convention, from what GQA supports in onnxruntime 1.31 (the newest onnxruntime-gpu) and
1.32: a call is either

* a *first prompt* (empty cache): rows right-padded to ``S``, ``seqlens_k[b] = len_b - 1``,
  ``total_sequence_length = S``, ``last_index[b] = len_b - 1``. The pad positions are written to
  the cache but never read: row ``b``'s next token is appended at position ``len_b``, over them;
* a *chunk on a non-empty cache* (the query after the cached prompt prefix): GQA allows
  ``S > 1`` with past context only for ``B == 1`` ("batch_size must be 1 when sequence_length > 1
  and past context is given"), so the runtime prefills such rows one at a time, binding each row's
  slice of the batch buffer (``seqlens_k = P + n - 1``, ``total = P + n``, ``last_index = n - 1``);
* a *decode step* (``S == 1``): one token per row at its own position ``seqlens_k[b]``; rows of
  different lengths decode together. ``total_sequence_length`` may be any value from the longest
  row's length up to ``L``: CUDA graphs pass ``L`` so that the captured value stays right.

onnxruntime 1.32 also has a ``query_seqlens`` input (one batched ragged chunk on top of a cache);
it is not used because onnxruntime-gpu 1.31 rejects a 17th GQA input.

Rotary embeddings run inside GQA (``do_rotary=1``, non-interleaved like Qwen2's ``rotate_half``)
from cos/sin caches of ``max_len`` positions computed as transformers does. RMSNorm is written with
plain ops in float32 (transformers' order), which onnxruntime fuses into its normalisation kernel.
q/k/v are one packed MatMul (GQA splits it); the LM head is a ``Gemm`` with ``transB=1`` on the
embedding matrix when the embeddings are tied (no second copy of the 136M-parameter table), and
runs on one position per row only.

``--dtype fp16`` writes a half-precision graph (weights, activations and KV cache; normalisation in
float32) for CUDA; ``int8`` quantises the MatMul weights dynamically (CPU), with the LM head as its
own MatMul so that it is quantised too. The directory gets the tokenizer files and the same
``manifest.json`` as ``generator.py`` plus ``kv_layout: "gqa-static"``, ``max_len`` and the graph's
I/O names.

Supports Qwen2 (and Llama-architecture checkpoints, whose projections have no bias) with SiLU MLP,
default rotary (no ``rope_scaling``) and no sliding window. Needs torch, transformers and onnx.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from generator import quantize_int8, save_model, write_generator_dir

log = logging.getLogger("tagrouter_fast.export.generator_gqa")

__all__ = ["GQA_EXPORT_VERSION", "build_gqa_decoder", "export_generator_gqa"]

DTYPES = ("fp32", "fp16", "int8")
KV_LAYOUT = "gqa-static"
# Bump when the graph or manifest changes meaning (keys cached test/bench exports).
GQA_EXPORT_VERSION = 1
# Default-domain opset 17 (ReduceMean's axes still an attribute) and IR 9 (ONNX 1.14): older
# than any onnxruntime whose GroupQueryAttention has built-in rotary, so they never limit it.
OPSET = 17
IR_VERSION = 9
DEFAULT_MAX_LEN = 4096
SUPPORTED = ("qwen2", "llama")


# ==== Graph builder ====


class _Builder:
    """Collects nodes and initializers; hands out unique tensor names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def init(self, name: str, array: Any) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs: Any) -> Any:
        from onnx import helper

        self._n += 1
        outs = [f"{op_type.lower()}_{self._n}_{k}" for k in range(n_out)]
        domain = "com.microsoft" if op_type == "GroupQueryAttention" else ""
        self.nodes.append(
            helper.make_node(
                op_type, inputs, outs, name=f"{op_type}_{self._n}", domain=domain, **attrs
            )
        )
        return outs[0] if n_out == 1 else outs


def _rms_norm(g: _Builder, x: str, weight: str, eps: str, half: bool) -> str:
    """transformers' Qwen2RMSNorm: float32 statistics, cast back, then the weight multiply.

    The Pow -> ReduceMean -> Add -> Sqrt -> Div (-> Cast) -> Mul chain is the pattern onnxruntime's
    SimplifiedLayerNormFusion recognises, so it runs as one kernel.
    """
    from onnx import TensorProto

    x32 = g.op("Cast", [x], to=TensorProto.FLOAT) if half else x
    var = g.op("ReduceMean", [g.op("Pow", [x32, "const_two"])], axes=[-1], keepdims=1)
    normed = g.op("Div", [x32, g.op("Sqrt", [g.op("Add", [var, eps])])])
    if half:
        normed = g.op("Cast", [normed], to=TensorProto.FLOAT16)
    return g.op("Mul", [normed, weight])


def _rotary_caches(cfg: Any, max_len: int) -> tuple[Any, Any]:
    """cos/sin of ``position * inv_freq`` in float32, computed the way transformers' default
    rotary embedding does (``(max_len, head_dim / 2)``; GQA repeats the halves itself)."""
    import torch

    head_dim = _head_dim(cfg)
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (float(cfg.rope_theta) ** exps)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.int64).float(), inv_freq)
    return freqs.cos().numpy(), freqs.sin().numpy()


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _check_config(cfg: Any) -> None:
    problems = []
    if cfg.model_type not in SUPPORTED:
        problems.append(f"model_type {cfg.model_type!r} (supported: {SUPPORTED})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg.hidden_act!r} (only silu)")
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        problems.append(f"rope_scaling {scaling!r} (only the default rotary)")
    if getattr(cfg, "use_sliding_window", False):
        problems.append("use_sliding_window=True")
    if getattr(cfg, "mlp_bias", False):
        problems.append("mlp_bias=True")
    if problems:
        raise ValueError("cannot write a GQA graph for this model: " + "; ".join(problems))


def build_gqa_decoder(
    cfg: Any,
    state: dict[str, Any],
    *,
    dtype: str = "fp32",
    max_len: int = DEFAULT_MAX_LEN,
    logits: bool = False,
    separate_head: bool = False,
) -> Any:
    """Build the static-KV-cache decoder graph from a causal LM's config and state dict.

    Args:
        cfg: The ``transformers`` config (Qwen2 or Llama architecture).
        state: ``model.state_dict()`` as float32 torch tensors.
        dtype: ``"fp32"`` or ``"fp16"`` (the whole graph, KV cache included).
        max_len: Rows of the rotary caches: the longest KV buffer the graph accepts.
        logits: Also output the last-position logits ``(B, vocab)``.
        separate_head: Give the LM head its own transposed weight even when tied (so that dynamic
            quantisation, which only quantises MatMuls with a constant weight, covers it).

    Returns:
        An ``onnx.ModelProto``.

    Raises:
        ValueError: The architecture or config is not one this graph reproduces.
    """
    import numpy as np
    from onnx import TensorProto, helper

    _check_config(cfg)
    half = dtype == "fp16"
    npd = np.float16 if half else np.float32
    elem = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    g = _Builder()

    def weight(name: str, transpose: bool = False) -> str:
        w = state[name].detach().float().numpy()
        return g.init(name, np.ascontiguousarray(w.T if transpose else w).astype(npd))

    n_layers = int(cfg.num_hidden_layers)
    heads, kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    head_dim = _head_dim(cfg)
    eps = float(cfg.rms_norm_eps)
    g.init("const_two", np.array(2.0, np.float32))
    g.init("rms_eps", np.array(eps, np.float32))
    cos, sin = _rotary_caches(cfg, max_len)
    g.init("cos_cache", cos.astype(npd))
    g.init("sin_cache", sin.astype(npd))

    attn_info: list[Any] = []
    embed = weight("model.embed_tokens.weight")
    h = g.op("Gather", [embed, "input_ids"], axis=0)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        x = _rms_norm(g, h, weight(p + "input_layernorm.weight"), "rms_eps", half)
        # One packed projection: GQA accepts q|k|v concatenated on the last axis.
        proj = [state[p + f"self_attn.{n}_proj.weight"].float() for n in ("q", "k", "v")]
        qkv_w = np.concatenate([t.numpy().T for t in proj], axis=1)
        qkv = g.op(
            "MatMul", [x, g.init(p + "qkv.weight_t", np.ascontiguousarray(qkv_w).astype(npd))]
        )
        if p + "self_attn.q_proj.bias" in state:
            bias = [state[p + f"self_attn.{n}_proj.bias"].float().numpy() for n in ("q", "k", "v")]
            qkv = g.op("Add", [qkv, g.init(p + "qkv.bias", np.concatenate(bias).astype(npd))])
        attn = g.op(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key.{i}", f"past_value.{i}", "seqlens_k"]
            + ["total_sequence_length", "cos_cache", "sin_cache"],
            n_out=3,
            num_heads=heads,
            kv_num_heads=kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
        )
        # GQA's cache outputs carry the graph's output names directly.
        g.nodes[-1].output[1] = f"present_key.{i}"
        g.nodes[-1].output[2] = f"present_value.{i}"
        # onnx's shape inference knows no com.microsoft op: declare what GQA returns so that types
        # propagate past it (the int8 quantiser needs every MatMul's output type).
        attn_info.append(
            helper.make_tensor_value_info(
                attn[0], elem, ["batch_size", "seq_len", heads * head_dim]
            )
        )
        o = g.op("MatMul", [attn[0], weight(p + "self_attn.o_proj.weight", transpose=True)])
        if p + "self_attn.o_proj.bias" in state:
            o = g.op("Add", [o, weight(p + "self_attn.o_proj.bias")])
        h = g.op("Add", [h, o])
        x = _rms_norm(g, h, weight(p + "post_attention_layernorm.weight"), "rms_eps", half)
        gate = g.op("MatMul", [x, weight(p + "mlp.gate_proj.weight", transpose=True)])
        up = g.op("MatMul", [x, weight(p + "mlp.up_proj.weight", transpose=True)])
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        h = g.op(
            "Add", [h, g.op("MatMul", [act, weight(p + "mlp.down_proj.weight", transpose=True)])]
        )

    # One position per row: RMSNorm is per position, so norm-after-gather is exact, and the LM
    # head (vocab x hidden, the largest matrix) sees B rows instead of B*S.
    g.init("last_index_axes", np.array([1], np.int64))
    last = g.op("GatherND", [h, g.op("Unsqueeze", ["last_index", "last_index_axes"])], batch_dims=1)
    x = _rms_norm(g, last, weight("model.norm.weight"), "rms_eps", half)
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) or "lm_head.weight" not in state
    if tied and not separate_head:
        g.op("Gemm", [x, embed], transB=1)
    else:
        src = "model.embed_tokens.weight" if tied else "lm_head.weight"
        w = np.ascontiguousarray(state[src].detach().float().numpy().T).astype(npd)
        g.op("MatMul", [x, g.init("lm_head.weight_t", w)])
    g.nodes[-1].output[0] = "logits"
    # First maximum, as torch.argmax and the optimum export.
    g.nodes.append(
        helper.make_node(
            "ArgMax",
            ["logits"],
            ["next_token"],
            name="next_token_argmax",
            axis=-1,
            keepdims=0,
            select_last_index=0,
        )
    )

    kv_shape: list[str | int] = ["batch_size", kv_heads, "kv_len", head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "seq_len"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("last_index", TensorProto.INT64, ["batch_size"]),
    ]
    outputs = [helper.make_tensor_value_info("next_token", TensorProto.INT64, ["batch_size"])]
    if logits:
        outputs.append(
            helper.make_tensor_value_info("logits", elem, ["batch_size", int(cfg.vocab_size)])
        )
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", elem, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", elem, kv_shape))
    graph = helper.make_graph(
        g.nodes, "tagrouter_gqa_decoder", inputs, outputs, g.inits, value_info=attn_info
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        producer_name="tagrouter_fast.export.generator_gqa",
    )
    model.ir_version = IR_VERSION
    return model


# ==== Export ====


def _load_state(model_dir: Path) -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    _check_config(cfg)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return cfg, dict(model.state_dict())


def export_generator_gqa(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    max_len: int = DEFAULT_MAX_LEN,
    logits: bool = False,
    source: str | None = None,
) -> Path:
    """Export a Qwen2 checkpoint directory as a static-KV-cache GQA decoder with a manifest.

    Args:
        model_dir: A Hugging Face model directory (config, weights, tokenizer files).
        out_dir: Output directory; created, and existing model files in it are replaced.
        dtype: ``"fp32"``, ``"fp16"`` (CUDA) or ``"int8"`` (dynamic quantisation, CPU).
        max_len: The longest KV buffer the graph accepts (prompt + generated tokens per row).
        logits: Also output the last-position logits.
        source: Provenance recorded in the manifest (defaults to the path).

    Returns:
        The output directory.

    Raises:
        ValueError: Unknown dtype, bad ``max_len``, or an architecture the graph cannot express.

    >>> export_generator_gqa("qwen2-dir", "out-gqa", dtype="fp16")  # doctest: +SKIP
    PosixPath('out-gqa')
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if max_len < 2:
        raise ValueError("max_len must be >= 2")
    model_dir = Path(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, state = _load_state(model_dir)
    log.info("writing the GQA decoder for %s (%s, max_len %d)", model_dir, dtype, max_len)
    model = build_gqa_decoder(
        cfg,
        state,
        dtype="fp16" if dtype == "fp16" else "fp32",
        max_len=max_len,
        logits=logits,
        separate_head=dtype == "int8",
    )
    del state
    for stale in ("model.onnx", "model.onnx_data", "model.onnx.data"):
        (out / stale).unlink(missing_ok=True)
    if dtype == "int8":
        with tempfile.TemporaryDirectory(prefix="tagrouter_gqa_", dir=out) as tmp:
            fp32_files = save_model(model, Path(tmp) / "fp32.onnx")
            del model
            files = quantize_int8(Path(tmp) / fp32_files[0], out / "model.onnx")
    else:
        files = save_model(model, out / "model.onnx")
    n_layers = int(cfg.num_hidden_layers)
    write_generator_dir(
        model_dir,
        out,
        cfg,
        files,
        source=source,
        dtype=dtype,
        opset=OPSET,
        export_version=GQA_EXPORT_VERSION,
        kv_layout=KV_LAYOUT,
        max_len=int(max_len),
        io={
            "inputs": ["input_ids", "seqlens_k", "total_sequence_length", "last_index"],
            "past": [[f"past_key.{i}", f"past_value.{i}"] for i in range(n_layers)],
            "present": [[f"present_key.{i}", f"present_value.{i}"] for i in range(n_layers)],
            "outputs": ["next_token"] + (["logits"] if logits else []),
        },
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face Qwen2 directory")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN, help="longest KV buffer")
    ap.add_argument("--logits", action="store_true", help="also output last-position logits")
    ap.add_argument("--source", default=None, help="provenance to record (e.g. a hub id)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = export_generator_gqa(
        args.model,
        args.out,
        dtype=args.dtype,
        max_len=args.max_len,
        logits=args.logits,
        source=args.source,
    )
    print(json.dumps({"out": str(out), "manifest": str(out / "manifest.json")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
