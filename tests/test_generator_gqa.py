"""Static-KV-cache GQA export (``export/generator_gqa.py``) and its decoding vs transformers.

The tiny random Qwen2 of ``export/tiny_qwen2.py`` is written as a GroupQueryAttention graph
(cached like the optimum export). Parity means identical greedy token ids to ``transformers``
``generate(do_sample=False)``, unbatched and batched with prompts of different lengths, with and
without the prompt-prefix cache. The CUDA-graph property, KV buffers that never move, is checked
on CPU through the buffers' addresses; the CUDA-graph run itself is the ``gpu`` test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from skip_policy import hardware, import_extra

pytestmark = pytest.mark.export

torch = import_extra("export", "torch")
transformers = import_extra("export", "transformers")
onnx = import_extra("export", "onnx")

from tagrouter_fast.tagging.cache import cache_dir  # noqa: E402
from tagrouter_fast.tagging.manifest import load_manifest  # noqa: E402
from tagrouter_fast.tagging.taggers.generator import TagGeneratorTagger  # noqa: E402

EXPORT_DIR = Path(__file__).resolve().parents[1] / "export"
sys.path.insert(0, str(EXPORT_DIR))
from generation_cases import (  # noqa: E402
    MAX_NEW,
    QUERIES,
    check_eos_stops_rows_independently,
    check_prefix_fallback_when_tokens_differ,
    hf_greedy,
)
from tiny_qwen2 import cached_gqa_export  # noqa: E402

ROOT = cache_dir() / "test-models"


@pytest.fixture(scope="session")
def gqa() -> tuple[Path, Path]:
    return cached_gqa_export(ROOT, dtype="fp32")


@pytest.fixture(scope="session")
def hf(gqa: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gqa[0], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gqa[0])
    tok.padding_side = "left"
    return model, tok


@pytest.fixture(scope="session")
def want(hf) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return hf_greedy(hf, QUERIES)


# ==== Graph contract ====


def test_manifest_and_io_contract(gqa) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    m = load_manifest(gqa[1], kind="generator")
    assert m["kv_layout"] == "gqa-static" and m["max_len"] == 4096
    assert m["dims"]["layers"] == 2 and m["chat_format"] == "chatml" and m["eos_token_ids"]
    sess = ort.InferenceSession(str(gqa[1] / m["model_file"]), providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in sess.get_inputs()}
    outs = {o.name: o for o in sess.get_outputs()}
    assert list(ins)[:4] == ["input_ids", "seqlens_k", "total_sequence_length", "last_index"]
    assert ins["seqlens_k"].type == "tensor(int32)" and ins["total_sequence_length"].shape == []
    assert list(outs)[0] == "next_token" and outs["next_token"].type == "tensor(int64)"
    for i in range(2):
        for kind in ("key", "value"):
            past, present = ins[f"past_{kind}.{i}"], outs[f"present_{kind}.{i}"]
            assert past.shape == present.shape == ["batch_size", 2, "kv_len", 16]
    graph = onnx.load(str(gqa[1] / m["model_file"])).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == 2
    # No shape arithmetic in the graph: nothing that onnxruntime could place on the CPU and
    # that would keep a CUDA graph from capturing the whole step.
    assert not {"Shape", "ConstantOfShape", "Expand", "Range"} & set(ops)


# ==== Greedy parity ====


@pytest.mark.parametrize("prefix_cache", [False, True], ids=["no-prefix", "prefix"])
def test_parity_unbatched(gqa, hf, prefix_cache: bool) -> None:  # type: ignore[no-untyped-def]
    tagger = TagGeneratorTagger(
        gqa[1], max_new_tokens=MAX_NEW, batch_size=1, prefix_cache=prefix_cache
    )
    assert tagger.kv_layout == "gqa-static" and tagger.io_binding
    for q in QUERIES:
        assert tagger.generate_ids([q]) == hf_greedy(hf, [q]), q
    assert tagger.stats["prefix_hits"] == (len(QUERIES) if prefix_cache else 0)


@pytest.mark.parametrize("prefix_cache", [False, True], ids=["no-prefix", "prefix"])
@pytest.mark.parametrize("batch_size", [3, 8])
def test_parity_batched_different_lengths(gqa, want, prefix_cache: bool, batch_size: int) -> None:  # type: ignore[no-untyped-def]
    tagger = TagGeneratorTagger(
        gqa[1], max_new_tokens=MAX_NEW, batch_size=batch_size, prefix_cache=prefix_cache
    )
    lens = [len(tagger.prompt_ids(q)) for q in QUERIES]
    assert len(set(lens)) == len(QUERIES)  # every batch mixes prompt lengths
    got = tagger.generate_ids(QUERIES)
    assert got == want
    assert all(len(g) == MAX_NEW for g in got)  # no EOS from random weights: the limit stops
    # Again on the same buffers: the cached prefix (or its overwrite) must not leak.
    assert tagger.generate_ids(QUERIES[::-1]) == want[::-1]


def test_parity_with_one_off_buffers(gqa, want) -> None:  # type: ignore[no-untyped-def]
    # kv_len smaller than every prompt: each batch gets a one-off buffer of its own length.
    tagger = TagGeneratorTagger(gqa[1], max_new_tokens=MAX_NEW, batch_size=4, kv_len=16)
    assert tagger.generate_ids(QUERIES) == want
    assert tagger._static is not None and not tagger._static._caches


def test_eos_stops_rows_independently(gqa, hf) -> None:  # type: ignore[no-untyped-def]
    check_eos_stops_rows_independently(gqa[1], hf)


def test_prefix_fallback_when_tokens_differ(gqa, hf) -> None:  # type: ignore[no-untyped-def]
    check_prefix_fallback_when_tokens_differ(gqa[1], hf)


def test_max_new_tokens_and_text_api(gqa) -> None:  # type: ignore[no-untyped-def]
    tagger = TagGeneratorTagger(gqa[1], max_new_tokens=5, batch_size=2)
    ids = tagger.generate_ids(QUERIES)
    assert [len(i) for i in ids] == [5] * len(QUERIES)
    assert tagger.generate_raw(QUERIES[:2]) == [
        tagger.tokenizer.decode(i, skip_special_tokens=True) for i in ids[:2]
    ]
    assert tagger.generate_ids([]) == []
    assert tagger.describe()["kv_layout"] == "gqa-static"


# ==== Fixed buffers (what CUDA graphs need) ====


def test_kv_buffers_never_move(gqa, want) -> None:  # type: ignore[no-untyped-def]
    """Every call writes the KV cache into the same preallocated buffers, and every decode step
    reuses one IO binding whose inputs and outputs keep their addresses."""
    tagger = TagGeneratorTagger(gqa[1], max_new_tokens=MAX_NEW, batch_size=4)
    dec = tagger._static
    assert dec is not None
    calls: list[tuple[object, list[int]]] = []
    run = tagger.session.run_with_iobinding

    def recording_run(io, run_options=None):  # type: ignore[no-untyped-def]
        run(io, run_options)
        calls.append((io, [v.data_ptr() for v in io.get_outputs()]))

    tagger.session.run_with_iobinding = recording_run  # type: ignore[method-assign]
    assert tagger.generate_ids(QUERIES) == want
    first = {b: (c.ptrs(), c.step) for b, c in dec._caches.items()}
    assert sorted(first) == [3, 4]  # 7 queries in batches of 4: one buffer set per batch size
    assert tagger.generate_ids(QUERIES) == want
    for b, cache in dec._caches.items():
        ptrs, step = first[b]
        assert cache.ptrs() == ptrs and cache.step is step  # nothing reallocated or rebound
        shape = tuple(cache.values[0].shape())
        assert shape == (b, 2, cache.length, 16)
    steps = {id(c.step.io): c for c in dec._caches.values() if c.step is not None}
    n_steps = 0
    for io, out_ptrs in calls:
        owner = steps.get(id(io))
        if owner is not None and owner.step is not None:
            n_steps += 1
            # Outputs in binding order: next_token, then every present, which is its past.
            assert out_ptrs[0] == owner.step.next_token.value.data_ptr()
            assert out_ptrs[1:] == owner.ptrs()
        else:
            # Prefill calls write inside some batch's buffers (a whole batch or one row).
            spans = [(p, p + c.batch * c.row_bytes) for c in dec._caches.values() for p in c.ptrs()]
            assert all(any(lo <= p < hi for lo, hi in spans) for p in out_ptrs[1:])
    assert n_steps == 2 * 2 * (MAX_NEW - 1)  # two runs, two batches, MAX_NEW - 1 steps each
    for cache in dec._caches.values():
        s = cache.step
        assert s is not None
        for staged in (s.ids, s.seqlens, s.last, s.next_token):
            assert staged.value.data_ptr() == staged.host.ctypes.data  # wrapped, not copied


def test_concurrent_calls_share_buffers_safely(gqa, want) -> None:  # type: ignore[no-untyped-def]
    import threading

    tagger = TagGeneratorTagger(gqa[1], max_new_tokens=MAX_NEW, batch_size=4)
    results: list[object] = [None] * 4
    barrier = threading.Barrier(4)

    def work(k: int) -> None:
        barrier.wait()
        results[k] = tagger.generate_ids(QUERIES)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [want] * 4


# ==== Other dtypes, CLI, errors ====


def test_fp16_export_has_half_kv_cache(gqa, want) -> None:  # type: ignore[no-untyped-def]
    _, d = cached_gqa_export(ROOT, dtype="fp16")
    tagger = TagGeneratorTagger(d, max_new_tokens=4, batch_size=2)
    assert tagger.kv_dtype is np.float16 and load_manifest(d)["dtype"] == "fp16"
    # Half precision is not bit-equal to transformers' fp32, but the tiny model's wide logit
    # margins keep the first tokens the same.
    assert tagger.generate_ids(QUERIES[:3]) == [w[:4] for w in want[:3]]
    inits = onnx.load(str(d / "model.onnx")).graph.initializer
    big = [t for t in inits if len(t.dims) == 2]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)


@pytest.mark.slow
def test_cli_int8_export_is_quantised_and_decodes(gqa, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "int8"
    cmd = [sys.executable, str(EXPORT_DIR / "generator_gqa.py"), "--model", str(gqa[0])]
    cmd += ["--out", str(out), "--dtype", "int8", "--max-len", "512", "--logits"]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    m = load_manifest(out, kind="generator")
    assert m["dtype"] == "int8" and m["max_len"] == 512 and m["io"]["outputs"][1] == "logits"
    ops = {n.op_type for n in onnx.load(str(out / m["model_file"])).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger"} and "GroupQueryAttention" in ops
    tagger = TagGeneratorTagger(out, max_new_tokens=6, batch_size=2)
    assert [len(i) for i in tagger.generate_ids(QUERIES[:3])] == [6, 6, 6]


def test_too_long_for_the_export_is_a_clear_error(gqa) -> None:  # type: ignore[no-untyped-def]
    tagger = TagGeneratorTagger(gqa[1], max_new_tokens=5000)
    with pytest.raises(ValueError, match="--max-len"):
        tagger.generate_ids(["hi"])
    with pytest.raises(ValueError, match="kv_len"):
        TagGeneratorTagger(gqa[1], kv_len=5000)
    with pytest.raises(ValueError, match="IO binding"):
        TagGeneratorTagger(gqa[1], io_binding=False)


def test_cuda_graph_without_cuda_ep_is_a_clear_error(gqa) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip(hardware("this onnxruntime has the CUDA EP (see test_cuda_graph_parity)"))
    _, d = cached_gqa_export(ROOT, dtype="fp16")
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider.*onnxruntime-gpu"):
        TagGeneratorTagger(d, cuda_graph=True)
    with pytest.raises(ValueError, match="fp16"):
        TagGeneratorTagger(gqa[1], cuda_graph=True)


# ==== CUDA ====


@pytest.mark.gpu
def test_cuda_graph_matches_io_binding(want) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(hardware("needs a CUDA GPU and onnxruntime-gpu (the 'cuda' extra)"))
    # fp16: onnxruntime's CUDA GroupQueryAttention has no float32 kernel.
    _, d = cached_gqa_export(ROOT, dtype="fp16")
    plain = TagGeneratorTagger(d, max_new_tokens=MAX_NEW, batch_size=4)
    assert plain.device == "cuda" and not plain.cuda_graph
    base = plain.generate_ids(QUERIES)
    assert [b[:4] for b in base] == [w[:4] for w in want]  # fp16 vs fp32: see the fp16 test
    graph = TagGeneratorTagger(d, max_new_tokens=MAX_NEW, batch_size=4, cuda_graph=True)
    assert graph.device == "cuda" and graph.cuda_graph
    # The first decode steps of a batch size capture its graph, the later ones replay it: the
    # same kernels on the same buffers, so the tokens are the IO-binding run's exactly.
    assert graph.generate_ids(QUERIES) == base
    dec = graph._static
    assert dec is not None
    ptrs = {b: c.ptrs() for b, c in dec._caches.items()}
    assert graph.generate_ids(QUERIES) == base
    assert {b: c.ptrs() for b, c in dec._caches.items()} == ptrs
    assert all(c.step is not None and c.step.graph_id is not None for c in dec._caches.values())
    assert graph.generate_ids(QUERIES[:1]) == base[:1]  # a third batch size, a third graph
    with pytest.raises(ValueError, match="fp16"):
        TagGeneratorTagger(cached_gqa_export(ROOT, dtype="fp32")[1], cuda_graph=True)
