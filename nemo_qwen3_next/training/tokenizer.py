"""`ByteTokenizer`: UTF-8 bytes as token ids, no vocabulary file and no hub download.

Ids 0..255 are the bytes, 256 is end-of-document (``eod``, also ``eos``), 257 is padding.
`vocab_size` is the embedding size the model is built with (the tiny presets use 512, which
leaves room for more special tokens and is a multiple of 128). It satisfies both NeMo's
`TokenizerSpec` and what Megatron's `GPTDataset` reads (``eod``, ``pad``).
"""

from __future__ import annotations

from typing import List

from nemo.collections.common.tokenizers.tokenizer_spec import TokenizerSpec

EOD_ID = 256
PAD_ID = 257


class ByteTokenizer(TokenizerSpec):
    def __init__(self, vocab_size: int = 512):
        if vocab_size < 258:
            raise ValueError(f"vocab_size = {vocab_size}: a byte tokenizer needs at least 258 (256 bytes + eod + pad).")
        self.vocab_size = vocab_size
        self.eos_id = EOD_ID
        self.pad_id = PAD_ID
        self.bos_id = None
        self.unk_id = None

    @property
    def eod(self) -> int:
        return EOD_ID

    @property
    def eos(self) -> int:
        return EOD_ID

    @property
    def pad(self) -> int:
        return PAD_ID

    @property
    def bos(self):
        return None

    # bytes <-> ids
    def text_to_ids(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def ids_to_text(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    # TokenizerSpec's token-level interface: a token is a one-character string per byte
    def text_to_tokens(self, text: str) -> List[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def tokens_to_text(self, tokens: List[str]) -> str:
        return self.ids_to_text([ord(t) for t in tokens])

    def tokens_to_ids(self, tokens: List[str]) -> List[int]:
        return [ord(t) for t in tokens]

    def ids_to_tokens(self, ids) -> List[str]:
        return [chr(int(i)) for i in ids]

    def tokenize(self, text: str) -> List[int]:
        return self.text_to_ids(text)

    def detokenize(self, ids) -> str:
        return self.ids_to_text(ids)
