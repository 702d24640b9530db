"""Report tokenizers that keep track of sentences (WordPiece/BPE via transformers, SentencePiece).

A report becomes ``[BOS] sentence_1 sentence_2 ... [EOS]`` with a parallel ``sentence_ids``
row saying which sentence each token belongs to (-1 for special tokens and padding), so one
pass of the text tower gives both the report vector and one vector per sentence.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from vlm.data.reports import split_sentences
from vlm.errors import ConfigError


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long
    sentence_ids: torch.Tensor  # (B, L) long, -1 = not in a sentence
    n_sentences: torch.Tensor  # (B,) long

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                    self.sentence_ids, self.n_sentences)))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class _Backend(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def save(self, folder: Path) -> dict[str, str]: ...


class HFBackend:
    """A transformers (fast) tokenizer loaded from a local folder: WordPiece, BPE, Unigram."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"no usable tokenizer in {folder} ({exc.__class__.__name__})"
                              ) from None
        t = self.tok
        self.bos_id = t.cls_token_id if t.cls_token_id is not None else t.bos_token_id
        self.eos_id = t.sep_token_id if t.sep_token_id is not None else t.eos_token_id
        self.pad_id = t.pad_token_id if t.pad_token_id is not None else 0
        self.vocab_size = len(t)
        if self.bos_id is None or self.eos_id is None:
            raise ConfigError(f"tokenizer in {folder} has no CLS/BOS or SEP/EOS token")

    def encode(self, text: str) -> list[int]:
        # verbose=False: ReportTokenizer cuts each sentence to the context length itself, so
        # transformers' "longer than the maximum sequence length" warning misleads
        return list(self.tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    def save(self, folder: Path) -> dict[str, str]:
        self.tok.save_pretrained(str(folder))
        return {"tokenizer": "hf", "tokenizer_path": "."}


class SentencePieceBackend:
    """A SentencePiece model file (SigLIP / T5-style text towers)."""

    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece as spm

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise ConfigError(f"SentencePiece model {model_file} not found")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.vocab_size = int(self.sp.get_piece_size())
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else self.pad_id
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else self.pad_id

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def save(self, folder: Path) -> dict[str, str]:
        shutil.copyfile(self.model_file, folder / "spiece.model")
        return {"tokenizer": "sentencepiece", "tokenizer_path": "spiece.model"}


def train_sentencepiece(texts: Sequence[str], model_prefix: str | Path, vocab_size: int = 1000,
                        model_type: str = "unigram") -> Path:
    """Train a SentencePiece model on report text (pad=0, unk=1, bos=2, eos=3)."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t.lower() for t in texts if t.strip()]), model_writer=buffer,
        vocab_size=vocab_size, model_type=model_type, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    path = Path(f"{model_prefix}.model")
    path.write_bytes(buffer.getvalue())
    return path


class ReportTokenizer:
    """Tokenize reports (split into sentences) or prompts (one sentence each)."""

    def __init__(self, backend: _Backend, context_length: int = 256, max_sentences: int = 16,
                 lowercase: bool = False) -> None:
        self.backend = backend
        self.context_length = int(context_length)
        self.max_sentences = int(max_sentences)
        self.lowercase = lowercase

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def __call__(self, texts: str | Sequence[str], split: bool = True) -> TokenBatch:
        if isinstance(texts, str):
            texts = [texts]
        rows: list[tuple[list[int], list[int], int]] = []
        budget = self.context_length - 2
        for text in texts:
            text = text.lower() if self.lowercase else text
            sentences = split_sentences(text, self.max_sentences) if split else [text]
            sentences = sentences or [text.strip() or "."]
            ids, sids = [self.backend.bos_id], [-1]
            for s_idx, sentence in enumerate(sentences):
                pieces = self.backend.encode(sentence)[: budget - (len(ids) - 1)]
                if not pieces:
                    break
                ids += pieces
                sids += [s_idx] * len(pieces)
            ids.append(self.backend.eos_id)
            sids.append(-1)
            rows.append((ids, sids, max(sids) + 1))
        length = max(len(r[0]) for r in rows)
        batch = len(rows)
        input_ids = torch.full((batch, length), self.backend.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.long)
        sentence_ids = torch.full((batch, length), -1, dtype=torch.long)
        for b, (ids, sids, _) in enumerate(rows):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            mask[b, : len(ids)] = 1
            sentence_ids[b, : len(sids)] = torch.tensor(sids)
        n = torch.tensor([r[2] for r in rows], dtype=torch.long)
        return TokenBatch(input_ids, mask, sentence_ids, n)

    def save(self, folder: Path) -> dict[str, str]:
        """Write the tokenizer files into ``folder``; returns the config fields to record."""
        folder.mkdir(parents=True, exist_ok=True)
        return self.backend.save(folder)
