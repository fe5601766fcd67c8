"""TagGenerator latency on one machine: onnxruntime (CUDA EP) vs torch eager vs torch compiled.

Builds a randomly initialised model with Qwen2.5-0.5B's architecture (random weights decode at the
real model's speed), exports it to ONNX with ``export/generator.py``, then times, in one process,
16 generated tag tokens after a ~120-token TagGenerator prompt at batch 1 and batch 32:

* ``ort``: tagrouter_fast's :class:`TagGeneratorTagger` on onnxruntime's CUDA EP: IO binding (the KV
  cache stays on the GPU; one int64 per row comes back per step), prompt-prefix KV cache, greedy
  ArgMax inside the graph. ``ort-noprefix``: the same without the prefix cache.
* ``ort-gqa``: the same model written by ``export/generator_gqa.py`` (GroupQueryAttention, a KV
  buffer preallocated per batch size and updated in place), IO binding, prefix cache (prefilled
  row by row on top of it, as GQA requires). ``ort-gqa-graph``: the same with every decode step
  replayed as an onnxruntime CUDA graph; ``ort-gqa-graph-noprefix``: CUDA graphs with all rows
  prefilled in one right-padded call (no prefix cache). CUDA only for the graph rows.
* ``torch-eager``: ``transformers`` ``generate`` (dynamic cache, sdpa attention).
* ``torch-compiled``: ``generate`` with ``cache_implementation="static"`` and
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs through inductor).

Every path generates exactly 16 tokens (EOS disabled), greedy. Results (p50/p90/mean ms per call,
ms per query) go to ``$OUT/gpu_bench.json`` (or ``--out``) and a table is printed.

GPU box::

    export PYTHONPATH=/tmp/site   # onnxruntime-gpu, see ../shared/gpu/README.md
    python export/gpu_bench.py

The box has torch but (probably) not transformers/optimum; their cp312 wheels are ~28 MB, so they
fit in one transfer. Here::

    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .gpuwheels \
      transformers==4.57.6 optimum==2.1.0 optimum-onnx==0.1.0 onnx==1.23.2 tokenizers==0.22.2 \
      huggingface-hub==0.36.2 safetensors==0.8.0 regex ml_dtypes protobuf pyyaml requests \
      urllib3 idna certifi charset-normalizer tqdm packaging

and there: ``pip install -q --no-index --no-deps --target /tmp/site .gpuwheels/*.whl``. The
script lists any module it cannot import before doing anything else.

Here (CPU, a tiny model, seconds)::

    python export/gpu_bench.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "export"))

QUERIES = [
    "Rewrite the sentence so that it's in the present tense: She had worked at the company for "
    "the past 3 years, and during that time she led two product launches and mentored new hires.",
    "Write a short poem about the sea at night, with a hopeful ending and at least one rhyme in "
    "every stanza, suitable for reading aloud to children before bed.",
    "Explain the difference between a process and a thread in operating systems, with an example "
    "from a web server, and say when you would prefer one over the other.",
    "Give me a three-day itinerary for Kyoto in autumn on a moderate budget, including temples, "
    "food markets and one day trip, and tips for avoiding the crowds.",
]


def _import_runtime() -> Any:
    """Import the generator runtime without the compiled extension or the tagging stack.

    On the GPU box the package's Rust extension and hnswlib may be missing; the generator runtime
    needs neither, so fall back to loading its modules from the source tree directly.
    """
    try:
        from tagrouter_fast.tagging.taggers import generator

        return generator
    except Exception:
        for name in list(sys.modules):
            if name == "tagrouter_fast" or name.startswith("tagrouter_fast."):
                del sys.modules[name]
        for pkg, sub in (("tagrouter_fast", ""), ("tagrouter_fast.tagging.taggers", "taggers")):
            mod = types.ModuleType(pkg)
            mod.__path__ = [str(ROOT / "python" / "tagrouter_fast" / sub)]  # type: ignore[attr-defined]
            sys.modules[pkg] = mod
        import importlib

        return importlib.import_module("tagrouter_fast.tagging.taggers.generator")


def _timeit(fn: Callable[[], Any], reps: int, warmup: int, sync: Callable[[], None]) -> dict:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))],
        "mean_ms": statistics.fmean(times),
        "min_ms": times[0],
        "reps": reps,
    }


def _queries(n: int, tok: Any, gen: Any, target_tokens: int) -> list[str]:
    """``n`` distinct queries whose full prompts are about ``target_tokens`` tokens long."""

    def length(q: str) -> int:
        return len(tok.encode(gen.render_chatml(gen.build_messages(q))).ids)

    out = []
    for i in range(n):
        words = (QUERIES[i % len(QUERIES)] + " Please be specific and concise.").split()
        q = f"Case {i}:"
        k = 0
        while length(q) < target_tokens:
            q += " " + words[k % len(words)]
            k += 1
        out.append(q)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="TagGenerator latency: onnxruntime vs torch")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model (a CPU smoke test)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=120)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--work", default=None, help="where models are built (default: a temp dir)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--json-name", default="gpu_bench.json", help="result file name in --out")
    ap.add_argument(
        "--skip",
        default="",
        help="comma list of paths to skip: ort,ort-noprefix,ort-gqa,ort-gqa-graph,"
        "ort-gqa-graph-noprefix,eager,compiled",
    )
    args = ap.parse_args(argv)

    import importlib.util

    need = ("numpy", "torch", "transformers", "optimum", "onnx", "onnxruntime", "tokenizers")
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"missing modules: {missing} (see this script's docstring)")

    import numpy as np
    import torch
    from generator import export_generator
    from generator_gqa import export_generator_gqa
    from tiny_qwen2 import make_qwen25_05b_shape, make_tiny_qwen2
    from transformers import AutoModelForCausalLM

    gen = _import_runtime()
    import onnxruntime as ort

    skip = set(filter(None, args.skip.split(",")))
    batches = [int(b) for b in args.batches.split(",")]
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU (use --device cpu --tiny)")
    dtype = "fp16" if cuda else "fp32"
    work = Path(args.work or tempfile.mkdtemp(prefix="tagrouter_gpu_bench_"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "ort_providers": ort.get_available_providers(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "cpu": platform.processor(),
        },
        "config": vars(args),
        "runs": [],
        "errors": {},
    }

    t0 = time.perf_counter()
    hf_dir = work / "hf"
    if not (hf_dir / "config.json").exists():
        (make_tiny_qwen2 if args.tiny else make_qwen25_05b_shape)(hf_dir, 0)
    onnx_dir = work / f"onnx-{dtype}"
    if not (onnx_dir / "manifest.json").exists():
        export_generator(hf_dir, onnx_dir, dtype=dtype, device="cuda" if cuda else "cpu")
    gqa_dir = work / f"onnx-gqa-{dtype}"
    gqa_paths = {"ort-gqa", "ort-gqa-graph", "ort-gqa-graph-noprefix"} - skip
    if gqa_paths and not (gqa_dir / "manifest.json").exists():
        try:
            export_generator_gqa(hf_dir, gqa_dir, dtype=dtype)
        except Exception as e:
            results["errors"]["gqa-export"] = traceback.format_exc()
            print(f"gqa export failed: {e!r}", flush=True)
            gqa_paths = set()
    results["build_s"] = time.perf_counter() - t0
    print(f"built and exported in {results['build_s']:.1f} s -> {onnx_dir}", flush=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def record(path: str, batch: int, stats: dict, **extra: Any) -> None:
        row = {
            "path": path,
            "batch": batch,
            **stats,
            "ms_per_query": stats["p50_ms"] / batch,
            **extra,
        }
        results["runs"].append(row)
        print(json.dumps(row), flush=True)

    providers = (
        [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        if cuda
        else ["CPUExecutionProvider"]
    )
    probe = gen.TagGeneratorTagger(onnx_dir, max_new_tokens=args.new_tokens, providers=providers)
    qs_all = _queries(max(batches), probe.tokenizer, gen, args.prompt_tokens)
    prompt_lens = [len(probe.prompt_ids(q)) for q in qs_all]
    results["prompt_tokens"] = {"min": min(prompt_lens), "max": max(prompt_lens)}
    results["prefix_tokens"] = len(probe._prefix_ids)
    del probe

    def time_tagger(path: str, make: Callable[[int], Any], tokens_key: str, **extra: Any) -> None:
        """Time one onnxruntime path at every batch size; ``make(batch)`` builds its tagger."""
        try:
            for b in batches:
                tagger = make(b)
                tagger.eos_ids = frozenset()  # exactly new_tokens tokens, like the torch paths
                qs = qs_all[:b]
                got = tagger.generate_ids(qs)  # also captures a CUDA-graph tagger's graph
                assert all(len(g) == args.new_tokens for g in got)
                stats = _timeit(
                    lambda t=tagger, q=qs: t.generate_ids(q), args.reps, args.warmup, sync
                )
                record(
                    path,
                    b,
                    stats,
                    device=tagger.device,
                    prefix_hits=tagger.stats["prefix_hits"],
                    **extra,
                )
                if b == 1:
                    results.setdefault(tokens_key, got[0])
                del tagger
        except Exception as e:
            results["errors"][path] = traceback.format_exc()
            print(f"{path} failed: {e!r}", flush=True)

    # ---- onnxruntime ----
    for path, prefix in (("ort", True), ("ort-noprefix", False)):
        if path in skip:
            continue
        time_tagger(
            path,
            lambda b, prefix=prefix: gen.TagGeneratorTagger(
                onnx_dir,
                max_new_tokens=args.new_tokens,
                batch_size=b,
                providers=providers,
                prefix_cache=prefix,
            ),
            "ort_tokens_b1",
        )

    # ---- onnxruntime, static KV cache (GroupQueryAttention) ----
    # Buffers just long enough for these prompts: a CUDA graph passes the buffer length as GQA's
    # total_sequence_length, so a longer one could only add attention work.
    kv_len = -(-(max(prompt_lens) + args.new_tokens) // 64) * 64
    for path, prefix, graph in (
        ("ort-gqa", True, False),
        ("ort-gqa-graph", True, True),
        ("ort-gqa-graph-noprefix", False, True),
    ):
        if path not in gqa_paths:
            continue
        if graph and not cuda:
            results.setdefault("skipped", {})[path] = "CUDA graphs need --device cuda"
            continue
        time_tagger(
            path,
            lambda b, prefix=prefix, graph=graph: gen.TagGeneratorTagger(
                gqa_dir,
                max_new_tokens=args.new_tokens,
                batch_size=b,
                providers=providers,
                prefix_cache=prefix,
                kv_len=kv_len,
                cuda_graph=graph,
            ),
            f"{path}_tokens_b1",
            kv_len=kv_len,
        )

    # ---- torch ----
    tdtype = torch.float16 if cuda else torch.float32
    dev = "cuda" if cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=tdtype, attn_implementation="sdpa")
    model = model.to(dev).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    tok.padding_side = "left"

    def encode(b: int) -> dict:
        texts = [gen.render_chatml(gen.build_messages(q)) for q in qs_all[:b]]
        return {k: v.to(dev) for k, v in tok(texts, return_tensors="pt", padding=True).items()}

    gen_kwargs = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    if "eager" not in skip:
        try:
            for b in batches:
                enc = encode(b)
                with torch.inference_mode():
                    out = model.generate(**enc, **gen_kwargs)
                    if b == 1:
                        results["eager_tokens_b1"] = out[0, enc["input_ids"].shape[1] :].tolist()
                    stats = _timeit(
                        lambda e=enc: model.generate(**e, **gen_kwargs),
                        args.reps,
                        args.warmup,
                        sync,
                    )
                record("torch-eager", b, stats)
        except Exception as e:
            results["errors"]["eager"] = traceback.format_exc()
            print(f"eager failed: {e!r}", flush=True)

    if "compiled" not in skip:
        try:
            if cuda:
                # transformers compiles the forward itself for a static cache on CUDA (CUDA graphs
                # through inductor's "reduce-overhead"); compiling it again here would nest.
                from transformers import CompileConfig

                static_kw = dict(
                    cache_implementation="static",
                    compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"),
                )
            else:
                # Its auto-compile is CUDA-only, so compile by hand for the CPU smoke test.
                model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
                static_kw = dict(cache_implementation="static", disable_compile=True)
            for b in batches:
                enc = encode(b)
                kw = dict(gen_kwargs, **static_kw)
                with torch.inference_mode():
                    tc = time.perf_counter()
                    model.generate(**enc, **kw)  # compiles
                    compile_s = time.perf_counter() - tc
                    stats = _timeit(
                        lambda e=enc, k=kw: model.generate(**e, **k),
                        args.reps,
                        max(args.warmup, 3),
                        sync,
                    )
                record("torch-compiled", b, stats, first_call_s=compile_s)
        except Exception as e:
            results["errors"]["compiled"] = traceback.format_exc()
            print(f"compiled failed: {e!r}", flush=True)

    def same_prefix(a: list[int], e: list[int]) -> int:
        return next(
            (i for i, (x, y) in enumerate(zip(a, e, strict=False)) if x != y), min(len(a), len(e))
        )

    if "eager_tokens_b1" in results:
        for key in ("ort", "ort-gqa", "ort-gqa-graph", "ort-gqa-graph-noprefix"):
            if f"{key}_tokens_b1" in results:
                results[f"{key}_vs_eager_same_prefix_tokens"] = same_prefix(
                    results[f"{key}_tokens_b1"], results["eager_tokens_b1"]
                )

    (out_dir / args.json_name).write_text(json.dumps(results, indent=2, default=str))
    print()
    print(f"{'path':<24}{'batch':>6}{'p50 ms':>10}{'p90 ms':>10}{'ms/query':>10}")
    for r in results["runs"]:
        print(
            f"{r['path']:<24}{r['batch']:>6}{r['p50_ms']:>10.1f}{r['p90_ms']:>10.1f}{r['ms_per_query']:>10.2f}"
        )
    if results["errors"]:
        print("errors in:", ", ".join(results["errors"]))
    for path, why in results.get("skipped", {}).items():
        print(f"skipped {path}: {why}")
    print(f"wrote {out_dir / args.json_name}")
    _ = np  # numpy is imported early so a broken install fails before the long export
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
