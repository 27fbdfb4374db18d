"""Byte-level BPE tokenizer for the small models trained from scratch.

Byte-level means every UTF-8 string round-trips exactly (there is no unknown character), and no
lowercasing or other normalisation is applied. The four special tokens have fixed ids so the model,
the diffusion masking and the data shards can rely on them without looking them up:

    0 <unk>   also the padding token
    1 <s>     beginning of sequence
    2 </s>    end of sequence, appended after every document
    3 <mask>  the diffusion mask token

Encoding text never inserts <s> or </s> by itself; callers add them where they want them.
"""

from __future__ import annotations

from pathlib import Path

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, MASK_TOKEN = "<unk>", "<s>", "</s>", "<mask>"
SPECIAL_TOKENS = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, MASK_TOKEN]  # list position = id


def train_tokenizer(
    files: list[str | Path],
    out_dir: str | Path,
    vocab_size: int = 4096,
    min_frequency: int = 2,
) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE on the text files and save it to `out_dir`.

    `out_dir` gets `tokenizer.json` and `tokenizer_config.json`, so
    `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it with the special tokens set.
    The same files and settings always give the same tokenizer.
    """
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("train_tokenizer needs at least one text file")
    for f in files:
        if not f.is_file():
            raise ValueError(f"tokenizer training file {f} does not exist or is not a file")
    # 256 byte symbols + the specials must fit, or BPE has no room for a single merge
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be larger than {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")

    bpe = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    bpe.train([str(f) for f in files], trainer)
    assert [bpe.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, BOS_ID, EOS_ID, MASK_ID]

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token=UNK_TOKEN,
        pad_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        clean_up_tokenization_spaces=False,  # keep " ." and " 's" as written: exact round trip
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


# The chat format shipped with every tokenizer (tokenizer_config.json): a plain transcript, as a base
# model continues it. "System: ...\nUser: ...\nAssistant: ..." and, with add_generation_prompt,
# a final "\nAssistant:" for the model to continue. Content may be a string or a list of text parts
# (the OpenAI message format).
CHAT_TEMPLATE = (
    "{%- set names = {'system': 'System', 'developer': 'System', 'user': 'User', 'assistant': 'Assistant'} -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in names -%}"
    "{{ raise_exception('unknown chat role: ' ~ message['role']) }}"
    "{%- endif -%}"
    "{%- if not loop.first %}{{ '\n' }}{% endif -%}"
    "{{ names[message['role']] ~ ': ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\nAssistant:' }}{%- endif -%}"
)


def load_tokenizer(path: str | Path) -> transformers.PreTrainedTokenizerFast:
    """Load a tokenizer saved by `train_tokenizer` (or any folder with a `tokenizer.json`)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise ValueError(
            f"no tokenizer at {path}: expected {path / 'tokenizer.json'} "
            "(train one with twotower.tokenizer.train_tokenizer)"
        )
    return transformers.AutoTokenizer.from_pretrained(str(path))


class IncrementalText:
    """The text of a growing token sequence, piece by piece, with stop strings (the server's
    streams and `twotower generate`). `feed` returns only text that can no longer change (no
    trailing partial UTF-8 character, no possible start of a stop string), so the streamed
    pieces always add up to the final text. `decode(ids) -> str` is the tokenizer's.

    Each call decodes a window of a few tokens, not the whole answer: the tokens since the last
    complete character, after the ones before it as context (a decoder may treat a sequence's
    first token specially; both decodes start at the same token, so that cancels out). Streaming
    costs the same per token at any answer length.
    """

    def __init__(self, decode, stop: tuple[str, ...]):
        self.decode, self.stop = decode, stop
        self.ids: list[int] = []
        self.context = self.decoded = 0  # ids[:decoded] are in `full`; ids[context:decoded] give the context
        self.full, self.text = "", ""  # all complete text so far; what has been returned of it

    def feed(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """Take new token ids; returns (new text, whether a stop string was reached)."""
        self.ids += ids
        known = self.decode(self.ids[self.context:self.decoded])
        now = self.decode(self.ids[self.context:])
        if final or (len(now) > len(known) and not now.endswith("\ufffd")):
            self.full += now[len(known):]
            self.context, self.decoded = self.decoded, len(self.ids)
        text = self.full
        # no stop string can begin in returned text: its start would have been held back below
        hits = [i for i in (text.find(s, len(self.text)) for s in self.stop) if i >= 0]
        if hits:
            text = text[:min(hits)]
        elif not final:
            text = text[:len(text) - self._partial_stop(text)]
        delta, self.text = text[len(self.text):], text
        return delta, bool(hits)

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        return max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
