"""Export a Hugging Face causal LM (the TagGenerator, a Qwen2.5-0.5B fine-tune) to an ONNX decoder.

Usage::

    python export/generator.py --model HF_DIR --out DIR [--dtype fp32|fp16|int8] [--opset N]

What ends up in ``DIR``:

* ``model.onnx`` (plus ``model.onnx_data`` for models over protobuf's 2 GB limit): ONE decoder with
  KV cache, optimum's ``text-generation-with-past`` export. Inputs ``input_ids``,
  ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value``; outputs ``logits``,
  ``next_token`` and ``present.{i}.key/value``.

  Why one decoder and not decoder + decoder-with-past (or optimum's legacy "merged" model with an
  ``If`` node): the with-past graph accepts a past of length 0, so the same graph does the prompt
  prefill and every decode step. Two graphs would hold the weights twice (1 GB more RAM for the
  0.5B model in fp32), and the merged ``If`` form hides the subgraphs from onnxruntime's graph
  optimisations and CUDA graphs. With the prompt-prefix KV cache the first call has a non-empty
  past anyway.

* Two graph edits after export, both exact (the parity tests compare tokens with transformers):
  the LM head only sees the last position (``logits`` is ``(batch, 1, vocab)``: prefilling a
  60-token prompt otherwise spends 60x the LM-head FLOPs, ~8 GMAC for Qwen's 151,936-token vocab,
  to produce logits nobody reads), and ``next_token = ArgMax(logits)`` so greedy decoding on a GPU
  copies back ``batch`` int64s per step instead of ``batch x vocab`` floats.
* ``--dtype int8``: onnxruntime dynamic quantisation of the MatMul weights (int8 per-channel
  weights, activations quantised per call), for CPU. ``fp16`` converts weights and the KV cache
  to half precision, for CUDA.
* The tokenizer files and ``manifest.json`` (:mod:`tagrouter_fast.tagging.manifest`): source,
  sha256 of
  every file, opset, dims (layers, heads, kv heads, head dim, hidden, vocab), EOS and pad ids, the
  chat template and whether the runtime's built-in ChatML renderer reproduces it, dtype.

Needs the ``export`` extra (torch, transformers, optimum-onnx); the runtime needs none of them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("tagrouter_fast.export.generator")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "config.json",
)
DTYPES = ("fp32", "fp16", "int8")
# Bump when the exported graph or manifest changes meaning; cached test/bench exports are keyed on
# it (and on library versions), so cosmetic edits to this file do not force a re-export.
EXPORT_VERSION = 1
# Python's int64 max, used as "to the end" in ONNX Slice.
_INT64_MAX = (1 << 63) - 1


# ==== Graph edits ====


def _last_position_logits(model: Any) -> None:
    """Make the LM head see only the last position and add a ``next_token`` ArgMax output.

    Args:
        model: An ``onnx.ModelProto`` from optimum's decoder export, edited in place.

    Raises:
        ValueError: The graph has no ``logits`` output produced by a MatMul (not a decoder export).
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    head = producer.get("logits")
    if head is None or head.op_type not in ("MatMul", "Gemm"):
        raise ValueError("expected the 'logits' output to come from a MatMul (the LM head)")
    hidden = head.input[0]
    names = {
        "starts": "tagrouter_last_starts",
        "ends": "tagrouter_last_ends",
        "axes": "tagrouter_last_axes",
    }
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1], np.int64), names["starts"]),
            numpy_helper.from_array(np.array([_INT64_MAX], np.int64), names["ends"]),
            numpy_helper.from_array(np.array([1], np.int64), names["axes"]),
        ]
    )
    sliced = "tagrouter_last_hidden"
    slice_node = helper.make_node(
        "Slice",
        [hidden, names["starts"], names["ends"], names["axes"]],
        [sliced],
        name="tagrouter_last_position",
    )
    head.input[0] = sliced
    argmax = helper.make_node(
        "ArgMax",
        ["logits"],
        ["next_token_3d"],
        name="tagrouter_argmax",
        axis=-1,
        keepdims=0,
        select_last_index=0,  # first maximum, as torch.argmax
    )
    # (batch, 1) -> (batch,): squeeze the sequence axis.
    g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "tagrouter_axis1"))
    squeeze = helper.make_node(
        "Squeeze", ["next_token_3d", "tagrouter_axis1"], ["next_token"], name="tagrouter_squeeze"
    )
    # Topological order: the slice goes right before the head, argmax after it.
    nodes = list(g.node)
    idx = nodes.index(head)
    nodes[idx : idx + 1] = [slice_node, head, argmax, squeeze]
    del g.node[:]
    g.node.extend(nodes)
    for out in g.output:
        if out.name == "logits":
            dims = out.type.tensor_type.shape.dim
            dims[1].ClearField("dim_param")
            dims[1].dim_value = 1
    g.output.insert(
        1, helper.make_tensor_value_info("next_token", TensorProto.INT64, ["batch_size"])
    )


def _materialize_head_weight(model: Any) -> None:
    """Give the LM head its own (transposed) weight when the export ties it to the embedding.

    With ``accelerate`` installed optimum de-duplicates tied weights, so the head reads
    ``Transpose(embed_tokens.weight)``. onnxruntime would fold that into a copy at load anyway,
    but dynamic quantisation only quantises MatMuls with a constant weight: left tied, the
    151,936 x 896 head (a quarter of the 0.5B model's weights) would stay fp32 and dominate
    each decode step.
    """
    from onnx import numpy_helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    head = producer["logits"]
    tr = producer.get(head.input[1])
    inits = {t.name: t for t in g.initializer}
    if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
        return
    perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None)
    w = numpy_helper.to_array(inits[tr.input[0]], base_dir="")
    g.initializer.append(numpy_helper.from_array(w.transpose(perm).copy(), "lm_head.weight_t"))
    head.input[1] = "lm_head.weight_t"
    if not any(tr.output[0] in n.input for n in g.node):
        g.node.remove(tr)


def save_model(model: Any, path: Path) -> list[str]:
    """Save ``model`` to ``path``, with external data when it is over protobuf's limit."""
    import onnx

    # ByteSize() itself fails past 2 GB, so count the weights instead.
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    data_name = path.name + "_data"
    (path.parent / data_name).unlink(missing_ok=True)
    if size > 1_800_000_000:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        return [path.name, data_name]
    onnx.save_model(model, str(path))
    return [path.name]


def quantize_int8(src: Path, dst: Path) -> list[str]:
    """Quantise ``src``'s constant-weight MatMuls to int8 (dynamic) as ``dst``; return files."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = (src.parent / (src.name + "_data")).exists()
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        use_external_data_format=large,
        extra_options={"MatMulConstBOnly": True},
    )
    # onnxruntime names the external data file itself ("model.onnx.data" in current versions).
    return [dst.name] + sorted(
        p.name for p in dst.parent.glob(dst.name + "*") if p.name != dst.name and p.is_file()
    )


def _to_fp16(model: Any) -> Any:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types=False: the KV cache travels in fp16 too, halving its memory traffic. The
    # normalisation's Pow/ReduceMean stay fp32 through onnxruntime's default op block list.
    return convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)


# ==== Chat template check ====


def _chat_template(model_dir: Path) -> str | None:
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        tpl = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(tpl, str):
            return tpl
    jinja = model_dir / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def _check_chat_template(model_dir: Path) -> bool:
    """Return whether the runtime's ChatML rendering equals ``apply_chat_template`` for the model.

    Checked on a few messages, including the TagGenerator prompt itself.
    """
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    from tagrouter_fast.tagging.taggers.generator import build_messages, render_chatml

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.chat_template is None:
        return False
    for query in ("Rewrite the sentence in the present tense.", "a\n\nb {x} [User Query]", ""):
        msgs = build_messages(query)
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if render_chatml(msgs) != want:
            return False
    return True


# ==== Export ====


def _sha256_dir(model_dir: Path) -> dict[str, str]:
    out = {}
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and (p.suffix in (".safetensors", ".json", ".bin", ".gguf")):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[p.name] = h.hexdigest()
    return out


def export_generator(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    opset: int | None = None,
    source: str | None = None,
    keep_fp32: bool = False,
    device: str = "cpu",
) -> Path:
    """Export a causal LM directory to an ONNX decoder directory with a manifest.

    Args:
        model_dir: A Hugging Face model directory (config, weights, tokenizer files).
        out_dir: Output directory; created, and existing model files in it are replaced.
        dtype: ``"fp32"``, ``"fp16"`` (CUDA) or ``"int8"`` (dynamic quantisation, CPU).
        opset: ONNX opset; ``None`` lets optimum pick (18 with current torch).
        source: Where the weights came from, recorded in the manifest (defaults to the path).
        keep_fp32: With ``int8``/``fp16``, also keep the fp32 graph as ``model_fp32.onnx``.
        device: ``"cuda"`` with ``fp16`` traces the model in half precision on the GPU (optimum's
            native fp16 export); otherwise the fp32 graph is traced on CPU and converted.

    Returns:
        The output directory.

    Raises:
        ValueError: Unknown dtype, or the model is not a decoder-only causal LM optimum exports.
    """
    import onnx
    from optimum.exporters.onnx import main_export
    from transformers import AutoConfig

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    model_dir = Path(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = AutoConfig.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory(prefix="tagrouter_export_", dir=out) as tmp:
        tmpd = Path(tmp)
        log.info("exporting %s with optimum (text-generation-with-past)", model_dir)
        native_fp16 = dtype == "fp16" and device == "cuda"
        main_export(
            str(model_dir),
            str(tmpd),
            task="text-generation-with-past",
            opset=opset,
            do_validation=False,
            library_name="transformers",
            device=device if native_fp16 else "cpu",
            dtype="fp16" if native_fp16 else None,
        )
        model = onnx.load(str(tmpd / "model.onnx"), load_external_data=True)
        used_opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        _materialize_head_weight(model)
        _last_position_logits(model)
        for stale in ("model.onnx", "model.onnx_data", "model_fp32.onnx", "model_fp32.onnx_data"):
            (out / stale).unlink(missing_ok=True)
        if dtype == "fp32":
            files = save_model(model, out / "model.onnx")
        elif native_fp16:
            files = save_model(model, out / "model.onnx")
        elif dtype == "fp16":
            if keep_fp32:
                save_model(model, out / "model_fp32.onnx")
            files = save_model(_to_fp16(model), out / "model.onnx")
        else:
            fp32_files = save_model(model, tmpd / "edited.onnx")
            del model
            files = quantize_int8(tmpd / fp32_files[0], out / "model.onnx")
            if keep_fp32:
                for f in fp32_files:
                    shutil.move(str(tmpd / f), out / f.replace("edited", "model_fp32"))
    write_generator_dir(model_dir, out, cfg, files, source=source, dtype=dtype, opset=used_opset)
    return out


def write_generator_dir(
    model_dir: Path,
    out: Path,
    cfg: Any,
    files: list[str],
    *,
    source: str | None,
    dtype: str,
    opset: int,
    export_version: int = EXPORT_VERSION,
    **fields: Any,
) -> None:
    """Copy the tokenizer files beside an exported decoder and write its generator manifest.

    Shared by every generator export (optimum's in this file, the static-cache GQA graph in
    ``generator_gqa.py``), so the runtime reads one manifest format whatever built the graph.

    Args:
        model_dir: The Hugging Face model directory the graph was built from.
        out: The export directory, already holding ``files``.
        cfg: The model's ``transformers`` config.
        files: The graph's files in ``out``, the model file first.
        source: Provenance to record (defaults to the model directory's path).
        dtype: The export dtype.
        opset: The graph's default-domain opset.
        export_version: The exporter's version (each exporter versions its own graphs).
        **fields: Extra manifest fields (e.g. ``kv_layout``).

    Raises:
        ValueError: The model directory has no ``tokenizer.json`` or no EOS id.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    from tagrouter_fast.tagging.manifest import write_manifest

    copied = []
    for name in TOKENIZER_FILES:
        src = model_dir / name
        if src.is_file():
            shutil.copyfile(src, out / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        raise ValueError(
            f"{model_dir} has no tokenizer.json (a fast tokenizer); the runtime reads only that"
        )
    template = _chat_template(model_dir)
    try:
        chatml_ok = _check_chat_template(model_dir)
    except Exception as e:  # a template that fails to render is reported, not fatal
        log.warning("could not check the chat template: %s", e)
        chatml_ok = False
    if not chatml_ok:
        log.warning(
            "the model's chat template does not render like ChatML for the TagGenerator prompt; "
            "the runtime's prompts will differ from apply_chat_template"
        )
    eos = _eos_ids(model_dir, cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    write_manifest(
        out,
        kind="generator",
        files=files + copied,
        model_file=files[0],
        tokenizer="tokenizer.json",
        source=source or str(model_dir.resolve()),
        source_sha256=_sha256_dir(model_dir),
        architecture=cfg.model_type,
        opset=opset,
        dtype=dtype,
        logits="last",
        dims={
            "layers": cfg.num_hidden_layers,
            "heads": cfg.num_attention_heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
            "head_dim": head_dim,
            "hidden": cfg.hidden_size,
            "vocab": cfg.vocab_size,
        },
        eos_token_ids=eos,
        pad_token_id=_pad_id(model_dir, cfg, eos),
        chat_template=template,
        chat_format="chatml" if chatml_ok else "unknown",
        export_version=export_version,
        **fields,
    )


def _eos_ids(model_dir: Path, cfg: Any) -> list[int]:
    ids: list[int] = []

    def add(v: Any) -> None:
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, int) and x not in ids:
                ids.append(x)

    gen = model_dir / "generation_config.json"
    if gen.is_file():
        add(json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id"))
    add(getattr(cfg, "eos_token_id", None))
    # The chat turn terminator is always a stop, whatever the configs say.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for special in ("<|im_end|>", "<|endoftext|>"):
        tid = tok.token_to_id(special)
        if tid is not None:
            add(tid)
    if not ids:
        raise ValueError(f"{model_dir}: no EOS token id in generation_config/config/tokenizer")
    return ids


def _pad_id(model_dir: Path, cfg: Any, eos: list[int]) -> int:
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        v = json.loads(gen.read_text(encoding="utf-8")).get("pad_token_id")
        if isinstance(v, int):
            return v
    v = getattr(cfg, "pad_token_id", None)
    return v if isinstance(v, int) else eos[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face causal LM directory")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--opset", type=int, default=None)
    ap.add_argument("--source", default=None, help="provenance to record (e.g. a hub id)")
    ap.add_argument("--keep-fp32", action="store_true", help="also keep the fp32 graph")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="trace device")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = export_generator(
        args.model,
        args.out,
        dtype=args.dtype,
        opset=args.opset,
        source=args.source,
        keep_fp32=args.keep_fp32,
        device=args.device,
    )
    print(json.dumps({"out": str(out), "manifest": str(out / "manifest.json")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
