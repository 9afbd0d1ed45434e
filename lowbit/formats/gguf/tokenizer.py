"""A Hugging Face tokenizer as llama.cpp's ``tokenizer.*`` GGUF keys, for a model that has no GGUF file of its own.

Byte-level BPE (Llama 3, SmolLM2, Qwen2/3) becomes llama.cpp's "gpt2" model: the vocabulary as stored in
tokenizer.json, and its merges. BPE with byte fallback (SentencePiece models: Gemma, Llama 2) becomes its "llama"
model, which merges by score: a piece's score is −id, since SentencePiece numbers its pieces in merge order and
llama.cpp only compares scores. Added tokens are CONTROL where special, USER_DEFINED otherwise; ids the vocabulary
leaves free up to the model's ``vocab_size`` are UNUSED ``[PADn]``, as llama.cpp's converter writes them.

llama.cpp re-implements each byte-level pre-tokenizer under a name (``tokenizer.ggml.pre``), so the name is read
off the tokenizer's own pre-tokenizer definition (:data:`PRE_TOKENIZERS`); one lowbit does not know is refused, not
written under a name that would split text differently. Special token ids, add-BOS/EOS flags and the chat template
come through gguf-py's ``SpecialVocab``.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from gguf import GGUFValueType, Keys, SpecialVocab, TokenType

from lowbit.errors import LowbitError
from lowbit.formats.gguf.metadata import Field

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
LLAMA3_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

PRE_TOKENIZERS = {  # the pre-tokenizer's steps, as :func:`pre_tokenizer_steps` reads them → llama.cpp's name
    (("ByteLevel", "regex"),): "gpt-2",
    (("Digits", "individual"), ("ByteLevel", "regex")): "smollm",
    (("Split", QWEN2_SPLIT), ("ByteLevel", "")): "qwen2",
    (("Split", LLAMA3_SPLIT), ("ByteLevel", "")): "llama-bpe",
}
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_ID_KEYS = {"bos": Keys.Tokenizer.BOS_ID, "eos": Keys.Tokenizer.EOS_ID, "unk": Keys.Tokenizer.UNK_ID,
            "sep": Keys.Tokenizer.SEP_ID, "pad": Keys.Tokenizer.PAD_ID,
            "mask": Keys.Tokenizer.MASK_ID}


def pre_tokenizer_steps(spec: Any) -> tuple:
    """tokenizer.json's ``pre_tokenizer`` as (kind, what matters to the split) per step."""
    if not spec:
        return ()
    if spec["type"] == "Sequence":
        return tuple(step for part in spec["pretokenizers"] for step in pre_tokenizer_steps(part))
    if spec["type"] == "ByteLevel":
        return (("ByteLevel", "regex" if spec.get("use_regex", True) else ""),)
    if spec["type"] == "Digits":
        return (("Digits", "individual" if spec.get("individual_digits") else "grouped"),)
    if spec["type"] == "Split":
        pattern = spec["pattern"]
        return (("Split", pattern.get("Regex", pattern.get("String"))),)
    return ((spec["type"], ""),)


def _pre_name(spec: Any) -> str:
    steps = pre_tokenizer_steps(spec)
    try:
        return PRE_TOKENIZERS[steps]
    except KeyError:
        raise LowbitError(
            f"the tokenizer's pre-tokenizer ({', '.join(kind for kind, _ in steps) or 'none'}) is not one lowbit can"
            f" name for llama.cpp (it knows {', '.join(sorted(set(PRE_TOKENIZERS.values())))}); export from a .gguf"
            " file of this model instead, which carries its tokenizer") from None


def _tokens(vocab: dict[str, int], added: dict[int, Any], vocab_size: int, spm: bool):
    """(tokens, token types, scores or None) for ids 0 … vocab_size − 1."""
    by_id = {i: t for t, i in vocab.items()}
    by_id.update({i: a.content for i, a in added.items()})
    if max(by_id) >= vocab_size:
        raise LowbitError(f"the tokenizer has ids up to {max(by_id)}, beyond the model's {vocab_size} embeddings")
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        token, kind, score = by_id.get(i), TokenType.NORMAL, -float(i)
        if token is None:
            token, kind, score = f"[PAD{i}]", TokenType.UNUSED, -1000.0
        elif i in added:
            kind, score = (TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED), -1000.0
            if spm and kind == TokenType.USER_DEFINED:
                token = token.replace("\u2581", " ")  # llama.cpp expects user-defined tokens pre-normalised
        elif spm and _BYTE.fullmatch(token):
            kind, score = TokenType.BYTE, 0.0
        tokens.append(token)
        types.append(int(kind))
        scores.append(score)
    return tokens, types, scores if spm else None


def hf_tokenizer_fields(tokenizer, vocab_size: int) -> list[Field]:
    """The ``tokenizer.*`` keys of a GGUF file for a transformers (fast) tokenizer of a model with ``vocab_size``
    embedding rows. Refuses, with the reason, a tokenizer llama.cpp would read differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError("a slow tokenizer (no tokenizer.json) is not converted to GGUF by lowbit; a fast one is")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise LowbitError(f"a {model['type']} tokenizer is not converted to GGUF by lowbit (BPE ones are)")
    spm = bool(model.get("byte_fallback"))
    if spm:
        normalizer = json.dumps(spec.get("normalizer") or {})
        kind, pre, space_prefix = "llama", "default", '"Prepend"' in normalizer
    else:
        kind, pre, space_prefix = "gpt2", _pre_name(spec.get("pre_tokenizer")), False
    tokens, types, scores = _tokens(model["vocab"], tokenizer.added_tokens_decoder, vocab_size, spm)
    S, A = GGUFValueType.STRING, GGUFValueType.ARRAY
    fields = [Field(Keys.Tokenizer.MODEL, kind, S), Field(Keys.Tokenizer.PRE, pre, S),
              Field(Keys.Tokenizer.LIST, tokens, A, S), Field(Keys.Tokenizer.TOKEN_TYPE, types, A, GGUFValueType.INT32)]
    if scores is not None:
        fields.append(Field(Keys.Tokenizer.SCORES, scores, A, GGUFValueType.FLOAT32))
    fields.append(Field(Keys.Tokenizer.ADD_PREFIX, space_prefix, GGUFValueType.BOOL))
    return fields + _special_fields(tokenizer, vocab_size, merges=not spm)


def _special_fields(tokenizer, vocab_size: int, merges: bool) -> list[Field]:
    """Merges, special ids and chat template, as gguf-py's SpecialVocab reads them from the tokenizer's saved files;
    whether BOS / EOS are added, as the tokenizer itself does it."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = SpecialVocab(Path(folder), load_merges=merges, n_vocab=vocab_size)
    A, U = GGUFValueType.ARRAY, GGUFValueType.UINT32
    fields = []
    if merges:
        if not special.merges:
            raise LowbitError("the tokenizer's BPE merges could not be read from its tokenizer.json")
        fields.append(Field(Keys.Tokenizer.MERGES, list(special.merges), A, GGUFValueType.STRING))
    fields += [Field(_ID_KEYS[kind], int(i), U) for kind, i in special.special_token_ids.items() if kind in _ID_KEYS]
    ids = tokenizer("a").input_ids
    fields += [Field(Keys.Tokenizer.ADD_BOS, tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id,
                     GGUFValueType.BOOL),
               Field(Keys.Tokenizer.ADD_EOS, tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id,
                     GGUFValueType.BOOL)]
    if isinstance(special.chat_template, str):
        fields.append(Field(Keys.Tokenizer.CHAT_TEMPLATE, special.chat_template, GGUFValueType.STRING))
    return fields
