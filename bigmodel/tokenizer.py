"""Tokenizers for the language model: character-level, or byte-level BPE through HF `tokenizers`.

Both are stored as one JSON document (`tokenizer.json`): HF's own format for BPE, and
`{"type": "bigmodel-char", "vocab": [...]}` for characters. The JSON text is copied into every
checkpoint (and later the ONNX model), so an artifact always carries the tokenizer that made its data.
No PyTorch here: `infer` uses this module too.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from bigmodel.errors import UserError

CHAR_TYPE = "bigmodel-char"
END_OF_TEXT = "<|endoftext|>"


class Tokenizer(Protocol):
    """What every tokenizer gives (read-only: a char vocabulary's constants and a BPE's properties alike)."""

    @property
    def kind(self) -> str: ...  # char, bpe, wordpiece, unigram
    @property
    def vocab_size(self) -> int: ...
    @property
    def eot_id(self) -> int | None: ...  # token appended after each document, if the tokenizer has one
    @property
    def longest_token(self) -> int: ...  # characters in the vocabulary's longest token (bounds a text's tokens)

    def encode(self, text: str) -> list[int]: ...
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def to_json(self) -> str: ...


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters seen in the corpus."""

    kind = "char"
    eot_id = None
    longest_token = 1

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab
        self.vocab_size = len(vocab)
        self._ids = {ch: i for i, ch in enumerate(vocab)}

    @classmethod
    def from_chars(cls, chars: Iterable[str]) -> CharTokenizer:
        return cls(sorted(set(chars)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[ch] for ch in text]
        except KeyError as exc:
            raise UserError(
                f"character {exc.args[0]!r} is not in this char-level model's vocabulary "
                f"({self.vocab_size} characters seen in its training text); remove it from the input"
            ) from None

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        return self.encode(text), [(i, i + 1) for i in range(len(text))]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"type": CHAR_TYPE, "vocab": self.vocab}, ensure_ascii=False)


class BPETokenizer:
    """A HF `tokenizers` tokenizer (byte-level BPE when bigmodel trains it; an imported one may be WordPiece
    or Unigram, and `kind` says which)."""

    def __init__(self, tokenizer: object) -> None:
        # A tokenizer.json may carry its own padding and truncation (a sentence-transformers one pads every
        # text to 128 tokens); text for a language model is never padded or cut by its tokenizer.
        tokenizer.no_padding()  # type: ignore[attr-defined]
        tokenizer.no_truncation()  # type: ignore[attr-defined]
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()  # type: ignore[attr-defined]
        self.eot_id = tokenizer.token_to_id(END_OF_TEXT)  # type: ignore[attr-defined]

    @property
    def kind(self) -> str:
        """ "bpe", "wordpiece" or "unigram": the HF model type (read on demand: it serialises the tokenizer)."""
        return str(json.loads(self._tok.to_str())["model"].get("type", "BPE")).lower()  # type: ignore[attr-defined]

    @functools.cached_property
    def longest_token(self) -> int:
        """Characters in the longest vocabulary entry (a byte-level token's characters are its bytes)."""
        return max(map(len, self._tok.get_vocab()), default=1)  # type: ignore[attr-defined]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids  # type: ignore[attr-defined]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of text as written (no BOS/EOS added: a chat template writes its own, as transformers'
        apply_chat_template), with each token's character span in `text`."""
        encoding = self._tok.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
        return encoding.ids, encoding.offsets

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]  # type: ignore[attr-defined]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)  # type: ignore[attr-defined]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)  # type: ignore[attr-defined]

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)  # type: ignore[attr-defined]

    def to_json(self) -> str:
        return self._tok.to_str()  # type: ignore[attr-defined]

    def encode_with_dropout(self, text: str, dropout: float, rng: Any) -> list[int]:
        """BPE-dropout (Provilkov et al. 2020): segment `text` with each applicable merge skipped with
        probability `dropout`, drawing from `rng` (a numpy Generator).

        HF tokenizers' BPE has a dropout option, but it draws from an unseeded thread-local RNG (the
        same text segments differently in every process), which would make prepare irreproducible. So
        the merge loop runs here, on the tokenizer's own pre-tokenizer, merge ranks and vocabulary;
        with dropout 0 it gives exactly encode()'s ids (tested)."""
        ranks, vocab, specials = self._merge_table()
        ids: list[int] = []
        # Special tokens written in the text stay whole, as in encode().
        for part in specials.split(text) if specials.pattern else [text]:
            if part in vocab and specials.fullmatch(part):
                ids.append(vocab[part])
                continue
            for piece, _ in self._tok.pre_tokenizer.pre_tokenize_str(part):  # type: ignore[attr-defined]
                symbols = list(piece)
                while len(symbols) > 1:
                    kept = rng.random(len(symbols) - 1) >= dropout  # which merges survive this round
                    candidates = [
                        (ranks[pair], i)
                        for i, pair in enumerate(itertools.pairwise(symbols))
                        if kept[i] and pair in ranks
                    ]
                    if not candidates:
                        break
                    _, i = min(candidates)  # the highest-priority merge, leftmost first (as HF's BPE)
                    symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
                ids += [vocab[symbol] for symbol in symbols]
        return ids

    def _merge_table(self) -> tuple[dict[tuple[str, str], int], dict[str, int], re.Pattern[str]]:
        """Merge ranks, vocabulary (special tokens included) and a pattern that splits out the specials."""
        if not hasattr(self, "_merges"):
            spec = json.loads(self.to_json())
            model = spec["model"]
            merges = [_merge_pair(m) for m in model["merges"]]
            added: dict[str, int] = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
            pattern = re.compile("(" + "|".join(map(re.escape, added)) + ")" if added else "")
            vocab: dict[str, int] = {**model["vocab"], **added}
            self._merges = ({pair: rank for rank, pair in enumerate(merges)}, vocab, pattern)
        return self._merges


def train_bpe(texts: Iterator[str], vocab_size: int) -> BPETokenizer:
    """Byte-level BPE (as GPT-2): every byte is in the base alphabet, so no input is ever unknown."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


def from_json(text: str, origin: str = "tokenizer") -> Tokenizer:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{origin}: not a valid tokenizer JSON ({exc})") from exc
    if isinstance(data, dict) and data.get("type") == CHAR_TYPE:
        return CharTokenizer(list(data["vocab"]))
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return BPETokenizer(HFTokenizer.from_str(text))
    except Exception as exc:  # tokenizers raises its own exception type
        raise UserError(f"{origin}: not a tokenizer.json that HF tokenizers can load ({exc})") from exc


def load(path: Path) -> Tokenizer:
    if not path.is_file():
        raise UserError(f"tokenizer not found: {path} (set data.tokenizer.path to a tokenizer.json)")
    return from_json(path.read_text(encoding="utf-8"), str(path))


def _merge_pair(merge: str | list[str]) -> tuple[str, str]:
    """A BPE merge as tokenizers' JSON stores it: "a b" (older files) or ["a", "b"]."""
    first, second = merge.split(" ", 1) if isinstance(merge, str) else merge
    return first, second
