"""Hugging Face tokenizers converted to llama.cpp's GGUF keys: the packaged models' tokenizers convert back to what
their own GGUF files hold, each byte-level pre-tokenizer gets llama.cpp's name for it, and one without a name is
refused rather than written under a wrong one."""

import pytest
from gguf import TokenType
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lowbit.errors import LowbitError
from lowbit.formats.gguf.metadata import tokenizer_fields
from lowbit.formats.gguf.tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT, hf_tokenizer_fields
from lowbit.models.loader import gguf_tokenizer_file


def _fields(fields) -> dict:
    return {f.key: f.value for f in fields}


def _both(model: str):
    """(the GGUF file's own tokenizer keys, those converted from the tokenizer transformers builds from it)."""
    path = gguf_tokenizer_file(model)
    own = _fields(tokenizer_fields(path))
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return own, _fields(hf_tokenizer_fields(hf, len(own["tokenizer.ggml.tokens"])))


def test_smollm2s_tokenizer_converts_back_to_its_gguf_keys():
    own, back = _both("smollm2-135m")
    for key in ("model", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
                "padding_token_id", "add_bos_token", "add_space_prefix"):
        assert back[f"tokenizer.ggml.{key}"] == own[f"tokenizer.ggml.{key}"], key
    assert back["tokenizer.chat_template"] == own["tokenizer.chat_template"]


@pytest.mark.slow  # ~30 s: 262k pieces read, converted by transformers and back
def test_gemmas_sentencepiece_tokenizer_converts_with_scores_in_the_same_order():
    own, back = _both("gemma-3-270m")
    for key in ("model", "pre", "bos_token_id", "eos_token_id", "add_bos_token", "add_space_prefix"):
        assert back[f"tokenizer.ggml.{key}"] == own[f"tokenizer.ggml.{key}"], key
    types, tokens, scores = (own[f"tokenizer.ggml.{k}"] for k in ("token_type", "tokens", "scores"))
    # the user-defined runs of spaces come back as ordinary pieces: transformers' tokenizer does not mark them
    kept = [i for i, t in enumerate(types) if t != TokenType.USER_DEFINED]
    assert len(kept) == len(types) - 165
    assert [back["tokenizer.ggml.tokens"][i] for i in kept] == [tokens[i] for i in kept]
    assert [back["tokenizer.ggml.token_type"][i] for i in kept] == [types[i] for i in kept]
    normal = [i for i in kept if types[i] == TokenType.NORMAL]  # llama.cpp merges by comparing these scores
    assert sorted(normal, key=lambda i: -scores[i]) == sorted(normal, key=lambda i: -back["tokenizer.ggml.scores"][i])


def _byte_level(steps, extra_ids: int = 0) -> PreTrainedTokenizerFast:
    vocab = {c: i for i, c in enumerate(["<s>", "a", "b", "1", "ab", "Ġ"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")


@pytest.mark.parametrize("steps, name", [
    ([pre_tokenizers.ByteLevel(add_prefix_space=False)], "gpt-2"),
    ([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)], "smollm"),
    ([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)], "qwen2"),
    ([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)], "llama-bpe"),
])
def test_each_byte_level_pre_tokenizer_gets_llama_cpps_name_and_free_ids_are_padded(steps, name):
    got = _fields(hf_tokenizer_fields(_byte_level(steps), vocab_size=8))
    assert got["tokenizer.ggml.pre"] == name and got["tokenizer.ggml.model"] == "gpt2"
    assert got["tokenizer.ggml.tokens"] == ["<s>", "a", "b", "1", "ab", "Ġ", "[PAD6]", "[PAD7]"]
    assert got["tokenizer.ggml.token_type"] == [TokenType.CONTROL] + [TokenType.NORMAL] * 5 + [TokenType.UNUSED] * 2
    assert got["tokenizer.ggml.merges"] == ["a b"] and got["tokenizer.ggml.bos_token_id"] == 0


def test_a_pre_tokenizer_llama_cpp_has_no_name_for_is_refused():
    tok = _byte_level([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(LowbitError, match=r"pre-tokenizer \(Whitespace, ByteLevel\) is not one lowbit can name"):
        hf_tokenizer_fields(tok, vocab_size=6)
    with pytest.raises(LowbitError, match="ids up to 5, beyond the model's 4 embeddings"):
        hf_tokenizer_fields(_byte_level([pre_tokenizers.ByteLevel(add_prefix_space=False)]), vocab_size=4)


def test_a_byte_fallback_bpe_becomes_llama_cpps_sentencepiece_model():
    vocab = {c: i for i, c in enumerate(["<unk>", "<s>", "<0x0A>", "▁", "a", "b", "▁a", "ab"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a"), ("a", "b")], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>", unk_token="<unk>")
    got = _fields(hf_tokenizer_fields(hf, vocab_size=8))
    assert got["tokenizer.ggml.model"] == "llama" and got["tokenizer.ggml.pre"] == "default"
    assert got["tokenizer.ggml.add_space_prefix"] is True and "tokenizer.ggml.merges" not in got
    assert got["tokenizer.ggml.token_type"][:4] == [TokenType.CONTROL, TokenType.CONTROL, TokenType.BYTE,
                                                    TokenType.NORMAL]
    assert got["tokenizer.ggml.scores"][3:] == [-3.0, -4.0, -5.0, -6.0, -7.0]  # merge order, as llama.cpp ranks
