"""Tiny random-weight GGUF models of several shapes, loadable by the real llama-server.

tests/tinymodels.py writes the one small llama the serving tests use; this module writes the variants
the memory estimator is checked on: large vocabularies (SentencePiece or BPE with merges), gemma3
sliding-window layers, per-layer KV head counts (the `deci` architecture reads them as arrays), and
Q4_0 weights (repacked by llama.cpp's CPU backend on AVX2 machines).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"  # llama | gemma3 | deci
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int | tuple[int, ...] = 2
    head_dim: int | None = None  # key/value length; n_embd // n_head when None
    n_ff: int = 128
    n_vocab: int = 512
    tokenizer: str = "llama"  # llama (SentencePiece) | gpt2 (BPE, with merges)
    n_ctx_train: int = 32768
    sliding_window: int | None = None
    swa_pattern: int | None = None
    pooling_type: int | None = None
    tied_embeddings: bool = False
    weight_type: str = "F16"  # F32 | F16 | Q4_0 | Q8_0 for the layers' matrices
    name: str = "tiny"
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    def kv_heads(self, layer: int) -> int:
        return self.n_head_kv[layer] if isinstance(self.n_head_kv, tuple) else self.n_head_kv


def _spm_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [gguf.TokenType.UNKNOWN, *[gguf.TokenType.CONTROL] * 4]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    words = ["▁the", "▁a", "▁hello", "▁world", "▁is", "▁of", "▁and", "▁to", "in", "er", "▁"]
    for i in range(n_vocab - len(tokens)):
        tokens.append(words[i] if i < len(words) else f"▁w{i:x}")
        types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * 5 + [-1000.0] * 256 + [-float(i) for i in range(n_vocab - 261)]
    return tokens[:n_vocab], scores[:n_vocab], [int(t) for t in types[:n_vocab]]


def _bpe_vocab(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Byte-level BPE: the 256 byte symbols, then merged pieces, each with the merge that makes it."""
    byte_symbols = [chr(c) for c in range(0x21, 0x7F)] + [chr(0x100 + i) for i in range(256 - 94)]
    tokens = list(byte_symbols)
    merges: list[str] = []
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    i = 0
    while len(tokens) < n_vocab - 2:
        left = letters[i % 26] + (f"{i // 26:x}" if i >= 26 else "")
        right = letters[(i * 7) % 26]
        merges.append(f"{left} {right}")
        tokens.append(left + right)
        i += 1
    tokens += ["<|im_start|>", "<|im_end|>"]
    types = [int(gguf.TokenType.NORMAL)] * (len(tokens) - 2) + [int(gguf.TokenType.CONTROL)] * 2
    return tokens, types, merges


def _tensor_list(spec: TinySpec) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape, ggml type) of every tensor, in file order."""
    e, hd, qt = spec.n_embd, spec.head_size, spec.weight_type
    embd_type = "F32" if qt == "F32" else "F16"
    out: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (spec.n_vocab, e), embd_type),
                                                   ("output_norm.weight", (e,), "F32")]
    if not spec.tied_embeddings:
        out.append(("output.weight", (spec.n_vocab, e), embd_type))
    for i in range(spec.n_layer):
        kv = spec.kv_heads(i) * hd
        out += [
            (f"blk.{i}.attn_norm.weight", (e,), "F32"),
            (f"blk.{i}.attn_q.weight", (spec.n_head * hd, e), qt),
            (f"blk.{i}.attn_k.weight", (kv, e), qt),
            (f"blk.{i}.attn_v.weight", (kv, e), qt),
            (f"blk.{i}.attn_output.weight", (e, spec.n_head * hd), qt),
            (f"blk.{i}.ffn_norm.weight", (e,), "F32"),
            (f"blk.{i}.ffn_gate.weight", (spec.n_ff, e), qt),
            (f"blk.{i}.ffn_up.weight", (spec.n_ff, e), qt),
            (f"blk.{i}.ffn_down.weight", (e, spec.n_ff), qt),
        ]
        if spec.arch == "gemma3":
            out += [(f"blk.{i}.attn_q_norm.weight", (hd,), "F32"), (f"blk.{i}.attn_k_norm.weight", (hd,), "F32"),
                    (f"blk.{i}.post_attention_norm.weight", (e,), "F32"),
                    (f"blk.{i}.post_ffw_norm.weight", (e,), "F32")]
    return out


def _data(rng: np.random.Generator, shape: tuple[int, ...], qtype: str) -> tuple[np.ndarray, dict[str, object]]:
    if len(shape) == 1:
        return np.ones(shape, dtype=np.float32), {}
    data = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    if qtype == "F32":
        return data, {}
    if qtype == "F16":
        return data.astype(np.float16), {}
    t = gguf.GGMLQuantizationType[qtype]
    return quantize(data, t), {"raw_dtype": t}


def write_model(path: Path, spec: TinySpec, *, split_max_tensors: int = 0, header_only: bool = False) -> Path:
    """Write `spec` as a GGUF file (or shards, with split_max_tensors) and return the path written (the
    first shard when split). header_only: the tensor data is left as a hole (a sparse file of the right
    size), for tests that only read headers."""
    w = gguf.GGUFWriter(str(path), spec.arch, split_max_tensors=split_max_tensors)
    _add_hparams(w, spec)
    _add_vocab(w, spec)
    _write_tensors(w, path, _tensor_list(spec), header_only)
    if split_max_tensors and not header_only:
        return path.with_name(path.stem + f"-00001-of-{_shard_count(path):05d}.gguf")
    return path


Tensors = list[tuple[str, tuple[int, ...], str]]


def _nbytes(shape: tuple[int, ...], qtype: str) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return int(np.prod(shape)) // block * size


def _write_tensors(w: gguf.GGUFWriter, path: Path, tensors: Tensors, header_only: bool) -> None:
    """Add `tensors` (random weights, ones for norms, zeros for biases), write the file and close it.
    header_only: only their infos, the data left as a hole of the right size."""
    rng = np.random.default_rng(0)
    for name, shape, qtype in tensors:
        if header_only:
            t = gguf.GGMLQuantizationType[qtype]
            w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=t)
            continue
        data, kw = _data(rng, shape, qtype)
        if name.endswith(".bias"):
            data = np.zeros(shape, dtype=np.float32)
        w.add_tensor(name, data, **kw)  # type: ignore[arg-type]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    if header_only:
        w.write_ti_data_to_file()
        w.close()
        _extend_to_data_size(path, tensors)
        return
    w.write_tensors_to_file()
    w.close()


def _extend_to_data_size(path: Path, tensors: Tensors) -> None:
    sizes = [_nbytes(shape, qtype) for _, shape, qtype in tensors]
    pad = gguf.GGUFWriter.ggml_pad
    data = sum(pad(n, 32) for n in sizes[:-1]) + sizes[-1]
    with path.open("r+b") as f:
        f.truncate(pad(f.seek(0, 2), 32) + data)


def _add_hparams(w: gguf.GGUFWriter, spec: TinySpec) -> None:
    arch = spec.arch
    w.add_name(spec.name)
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    if isinstance(spec.n_head_kv, tuple):
        w.add_array(f"{arch}.attention.head_count_kv", list(spec.n_head_kv))
    else:
        w.add_head_count_kv(spec.n_head_kv)
    if spec.head_dim is not None:
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(spec.head_size)
    if spec.sliding_window is not None:
        w.add_sliding_window(spec.sliding_window)
    if spec.swa_pattern is not None:
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", spec.swa_pattern)
    if spec.pooling_type is not None:
        w.add_pooling_type(gguf.PoolingType(spec.pooling_type))
    for key, value in spec.extra.items():
        w.add_uint32(key, value)
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[spec.weight_type]
    w.add_file_type(file_type)


def _shard_count(path: Path) -> int:
    return len(list(path.parent.glob(path.stem + "-*-of-*.gguf")))


def _add_vocab(w: gguf.GGUFWriter, spec: TinySpec) -> None:
    if spec.tokenizer == "gpt2":
        tokens, types, merges = _bpe_vocab(spec.n_vocab)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(len(tokens) - 2)
        w.add_eos_token_id(len(tokens) - 1)
    else:
        tokens, scores, ttypes = _spm_vocab(spec.n_vocab)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(ttypes)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template(CHATML)


# The two generated models bench/memory.py and the estimator tests measure besides Gemma 3 270M.
LLAMA_32K = TinySpec(arch="llama", n_embd=256, n_layer=4, n_head=8, n_head_kv=2, n_ff=768, n_vocab=32000,
                     weight_type="Q4_0", name="tiny-llama-32k")
GEMMA_SWA = TinySpec(arch="gemma3", n_embd=128, n_layer=6, n_head=4, n_head_kv=1, head_dim=64, n_ff=512,
                     n_vocab=8192, sliding_window=256, tied_embeddings=True, name="tiny-gemma3-swa")

# Models the estimator's fitted terms were measured on (bench/memory.py --calibration): vocabulary
# sizes and tokenizer kinds, layer counts, per-layer KV head counts.
CALIBRATION: dict[str, TinySpec] = {
    "spm1k": TinySpec(n_vocab=1000, name="spm1k"),
    "spm64k": TinySpec(n_vocab=64000, name="spm64k"),
    "spm256k": TinySpec(n_vocab=256000, name="spm256k"),
    "bpe16k": TinySpec(n_vocab=16000, tokenizer="gpt2", name="bpe16k"),
    "bpe150k": TinySpec(n_vocab=150000, tokenizer="gpt2", name="bpe150k"),
    "layers16": TinySpec(n_layer=16, n_vocab=1000, weight_type="F32", name="layers16"),
    "layers96": TinySpec(n_layer=96, n_vocab=1000, weight_type="F32", name="layers96"),
    "deci": TinySpec(arch="deci", n_embd=256, n_layer=4, n_head=8, n_head_kv=(2, 1, 4, 8), n_ff=512, n_vocab=2000,
                     name="deci-kv-heads"),
}
GENERATED: dict[str, TinySpec] = {"llama32k": LLAMA_32K, "gemmaswa": GEMMA_SWA, **CALIBRATION}


# --- BERT-style encoders (non-causal, no KV cache) ----------------------------------------------------
# src/models/bert.cpp load_arch_tensors: token_embd, position_embd (n_ctx_train rows), token_types
# (needs tokenizer.ggml.token_type_count), token_embd_norm, and per layer attn_q/k/v, attn_output,
# attn_output_norm, ffn_up, ffn_down, layer_output_norm (biases optional; written here, as converted
# BERT models carry them). A classification head for --reranking: cls (n_embd x n_embd), cls.output
# (n_embd x n_cls_out, one label by default). The tokenizer is "bert" (WPM): llama.cpp's defaults put
# [PAD] at 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103; the ids are written explicitly anyway.
RANK_POOLING = 4  # gguf.PoolingType.RANK


def _wpm_vocab(n_vocab: int) -> tuple[list[str], list[int]]:
    """[PAD], [unusedN]..., [UNK] [CLS] [SEP] [MASK] at BERT's ids, then words ("▁" marks a word start,
    as convert_hf_to_gguf.py writes WordPiece vocabularies) and single characters."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    types = [int(gguf.TokenType.CONTROL)] * len(tokens)
    types[100] = int(gguf.TokenType.UNKNOWN)
    words = ["▁the", "▁a", "▁hello", "▁world", "▁how", "▁are", "▁you", "▁is", "▁of", "▁and", "▁to", "▁?", "▁,", "▁."]
    words += [f"▁{c}" for c in "bcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz")
    i = 0
    while len(tokens) + len(words) < n_vocab:
        words.append(f"▁w{i:x}")
        i += 1
    tokens += words
    types += [int(gguf.TokenType.NORMAL)] * len(words)
    return tokens[:n_vocab], types[:n_vocab]


def _bert_tensor_list(spec: TinySpec) -> list[tuple[str, tuple[int, ...], str]]:
    e, ff, qt = spec.n_embd, spec.n_ff, spec.weight_type
    out: list[tuple[str, tuple[int, ...], str]] = [
        ("token_embd.weight", (spec.n_vocab, e), "F16" if qt != "F32" else "F32"),
        ("token_types.weight", (2, e), "F32"),
        ("position_embd.weight", (spec.n_ctx_train, e), "F32"),
        ("token_embd_norm.weight", (e,), "F32"),
        ("token_embd_norm.bias", (e,), "F32"),
    ]
    for i in range(spec.n_layer):
        for w in ("attn_q", "attn_k", "attn_v", "attn_output"):
            out += [(f"blk.{i}.{w}.weight", (e, e), qt), (f"blk.{i}.{w}.bias", (e,), "F32")]
        out += [(f"blk.{i}.attn_output_norm.weight", (e,), "F32"), (f"blk.{i}.attn_output_norm.bias", (e,), "F32"),
                (f"blk.{i}.ffn_up.weight", (ff, e), qt), (f"blk.{i}.ffn_up.bias", (ff,), "F32"),
                (f"blk.{i}.ffn_down.weight", (e, ff), qt), (f"blk.{i}.ffn_down.bias", (e,), "F32"),
                (f"blk.{i}.layer_output_norm.weight", (e,), "F32"), (f"blk.{i}.layer_output_norm.bias", (e,), "F32")]
    if spec.pooling_type == RANK_POOLING:
        out += [("cls.weight", (e, e), "F32"), ("cls.bias", (e,), "F32"),
                ("cls.output.weight", (1, e), "F32"), ("cls.output.bias", (1,), "F32")]
    return out


def write_bert(path: Path, spec: TinySpec, *, header_only: bool = False) -> Path:
    """Write a BERT-architecture encoder for `spec` (arch "bert"; pooling_type from the spec, mean
    when unset; RANK_POOLING adds the classification head --reranking needs)."""
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_name(spec.name)
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType(spec.pooling_type if spec.pooling_type is not None else 1))
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[spec.weight_type])
    tokens, types = _wpm_vocab(spec.n_vocab)
    w.add_tokenizer_model("bert")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_type_count(2)
    w.add_unk_token_id(100)
    w.add_bos_token_id(101)  # [CLS]
    w.add_sep_token_id(102)
    w.add_pad_token_id(0)
    w.add_mask_token_id(103)
    w.add_add_bos_token(True)
    w.add_add_sep_token(True)
    _write_tensors(w, path, _bert_tensor_list(spec), header_only)
    return path


def write_any(path: Path, spec: TinySpec, *, header_only: bool = False) -> Path:
    """write_bert for arch "bert", write_model otherwise."""
    if spec.arch == "bert":
        return write_bert(path, spec, header_only=header_only)
    return write_model(path, spec, header_only=header_only)


# Encoders for embedding and reranking mode: a 30k-token WordPiece vocabulary like BERT's, mean pooling
# (and a reranker with the classification head), 512 positions as BERT base has.
BERT = TinySpec(arch="bert", n_embd=128, n_layer=4, n_head=4, n_head_kv=4, n_ff=512, n_vocab=30522,
                tokenizer="bert", n_ctx_train=512, pooling_type=1, weight_type="F16", name="tiny-bert")
BERT_RANK = TinySpec(arch="bert", n_embd=128, n_layer=4, n_head=4, n_head_kv=4, n_ff=512, n_vocab=30522,
                     tokenizer="bert", n_ctx_train=512, pooling_type=RANK_POOLING, weight_type="F16",
                     name="tiny-bert-rerank")
GENERATED.update({"bert": BERT, "bertrank": BERT_RANK})
