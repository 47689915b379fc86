"""Byte-level tokenizer: token i < 256 is byte i of the UTF-8 text; three special tokens follow."""


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then bos_id = 256, eos_id = 257, pad_id = 258 (vocab_size 259).

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hi", bos=True, eos=True)
        [256, 104, 105, 257]
        >>> tok.decode([104, 105, 257])
        'hi'
    """
    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text, *, bos=False, eos=False):
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return ([self.bos_id] if bos else []) + list(text.encode("utf-8")) + ([self.eos_id] if eos else [])

    def decode(self, ids):
        """Bytes back to text; special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __len__(self):
        return self.vocab_size
