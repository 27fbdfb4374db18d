from pathlib import Path

import pytest
import transformers

from conftest import story_text
from twotower.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, load_tokenizer, train_tokenizer

VOCAB = 512


def write_training_slice(path: Path) -> Path:
    """The repository's sample text, so training takes well under a second."""
    path.write_text(story_text(60_000))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    out = tmp / "tokenizer"
    tokenizer = train_tokenizer([write_training_slice(tmp / "slice.txt")], out, vocab_size=VOCAB)
    return tokenizer, out


def test_special_ids_are_fixed_and_autotokenizer_loads_them(trained):
    tokenizer, out = trained
    assert (PAD_ID, BOS_ID, EOS_ID, MASK_ID) == (0, 1, 2, 3)
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<mask>"]) == [0, 1, 2, 3]
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    assert loaded.bos_token_id == BOS_ID
    assert loaded.eos_token_id == EOS_ID
    assert loaded.pad_token_id == PAD_ID
    assert loaded.unk_token_id == PAD_ID
    assert loaded.mask_token_id == MASK_ID
    assert len(loaded) == VOCAB


def test_encoding_adds_no_bos_or_eos(trained):
    loaded = load_tokenizer(trained[1])
    ids = loaded("Once upon a time")["input_ids"]
    assert ids == loaded.encode("Once upon a time")
    assert BOS_ID not in ids and EOS_ID not in ids
    assert loaded.decode(ids) == "Once upon a time"


def test_round_trip_of_every_sample_character(trained):
    sample = story_text()
    # every distinct character, spacing that a cleanup pass would change, and bytes never trained on
    text = "".join(sorted(set(sample))) + sample[:3000] + " it ' s , . ! ? don 't \t  café 🙂\n\n end "
    for tokenizer in (trained[0], load_tokenizer(trained[1])):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert PAD_ID not in ids  # byte-level: nothing falls back to <unk>


def test_training_is_deterministic(trained, tmp_path):
    out = tmp_path / "again"
    train_tokenizer([write_training_slice(tmp_path / "slice.txt")], out, vocab_size=VOCAB)
    assert (out / "tokenizer.json").read_bytes() == (trained[1] / "tokenizer.json").read_bytes()


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "out")
