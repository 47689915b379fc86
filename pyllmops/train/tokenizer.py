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


class HFTokenizer:
    """A Hugging Face tokenizer (transformers' PreTrainedTokenizerBase) as the loops use it.

    encode_pair_ids(prompt, completion) -> (prompt ids, completion ids): with a chat template the prompt
    is the user turn with the generation prompt and the completion is what the template adds for the
    assistant turn (its end-of-turn tokens included); without one, [bos] prompt and completion [eos]
    (bos / eos only when the tokenizer has them), as the byte tokenizer does.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tokenizer)
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def _ids(self, text):
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _template(self, messages, add_generation_prompt):
        out = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        if isinstance(out, dict) or hasattr(out, "keys"):  # some versions return a BatchEncoding
            out = out["input_ids"]
        return list(out)

    def encode(self, text, *, bos=False, eos=False):
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return ([self.bos_id] if bos and self.bos_id is not None else []) + self._ids(text) + (
            [self.eos_id] if eos and self.eos_id is not None else [])

    def encode_pair_ids(self, prompt, completion):
        if not self.chat:
            return self.encode(prompt, bos=True), self.encode(completion, eos=True)
        user = [{"role": "user", "content": prompt}]
        p = self._template(user, True)
        full = self._template(user + [{"role": "assistant", "content": completion}], False)
        if full[:len(p)] != p:
            raise ValueError("the chat template renders the prompt differently with and without the assistant turn, "
                             "so the completion tokens cannot be separated; pass a tokenizer without chat_template")
        return p, full[len(p):]

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def __len__(self):
        return self.vocab_size


def as_tokenizer(tokenizer):
    """ByteTokenizer() for None, an HFTokenizer for a transformers tokenizer, else the object as it is
    (it needs encode(text, bos=, eos=) or encode_pair_ids(prompt, completion))."""
    if tokenizer is None:
        return ByteTokenizer()
    if hasattr(tokenizer, "apply_chat_template") and hasattr(tokenizer, "convert_tokens_to_ids"):
        return HFTokenizer(tokenizer)
    return tokenizer
