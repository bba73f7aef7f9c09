"""Tiny tokenizers (at most 96 tokens, the fixtures' vocabulary) trained offline with `tokenizers`.

One per architecture, in the style of the real ones: GPT-2 byte-level BPE, Llama SentencePiece-like
BPE (Metaspace, <s> prepended, <unk>), BERT WordPiece (lowercasing normalizer, [CLS] ... [SEP]).
Training is deterministic (no randomness involved); the result is committed anyway.
"""

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

VOCAB = 96

CORPUS = [
    "The cat sat on the mat.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The movie was great, and the actors were good!",
    "She said: it is not that bad... or is it?",
    "Tokens, tokens and more tokens; the end.",
    "It was the best of times, it was the worst of times.",
    "Rotten or fresh? The critics can't agree.",
]

# Sentences for parity checks. Characters outside the corpus exercise unknown-token handling
# (BERT's [UNK], Llama's <unk>); GPT-2 byte-level has no unknown token, so its sentences stay in the
# corpus alphabet.
SENTENCES = {
    "common": [
        "The cat sat on the mat.",
        "A man is eating a piece of bread.",
        "  two spaces,  then tokens!",
        "The critics can't agree; the end?",
        "",
    ],
    "unknown": ["Zebras quickly jump 42 times.", "Café naïve"],
}


def build_tokenizer(arch: str) -> Tokenizer:
    if arch == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=[],
                                      show_progress=False)
    elif arch == "llama":
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                      initial_alphabet=[], show_progress=False)
    elif arch == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=VOCAB,
                                            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                            show_progress=False)
    else:
        raise ValueError(arch)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if arch == "llama":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    elif arch == "bert":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    assert tok.get_vocab_size() <= VOCAB, (arch, tok.get_vocab_size())
    return tok


def tokens_record(arch: str, tok: Tokenizer) -> dict:
    kinds = {"gpt2": "byte-level BPE (GPT-2 style)", "llama": "Metaspace BPE with <unk> and <s> (Llama style)",
             "bert": "WordPiece, lowercase, [CLS] $A [SEP] (BERT style)"}
    sentences = SENTENCES["common"] + (SENTENCES["unknown"] if arch != "gpt2" else [])
    cases = []
    for text in sentences:
        with_special = tok.encode(text, add_special_tokens=True)
        plain = tok.encode(text, add_special_tokens=False)
        cases.append({
            "text": text,
            "ids": with_special.ids,
            "tokens": with_special.tokens,
            "offsets": [list(o) for o in with_special.offsets],
            "ids_no_special": plain.ids,
            "decoded": tok.decode(with_special.ids, skip_special_tokens=True),
        })
    pair = tok.encode(sentences[0], sentences[1], add_special_tokens=True)
    return {
        "kind": kinds[arch],
        "vocab_size": tok.get_vocab_size(),
        "note": "ids: encode(text, add_special_tokens=True); ids_no_special: without; decoded: "
                "decode(ids, skip_special_tokens=True); pair: encode(a, b) with special tokens",
        "cases": cases,
        "pair": {"a": sentences[0], "b": sentences[1], "ids": pair.ids, "type_ids": pair.type_ids},
    }
