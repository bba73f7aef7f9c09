"""Tiny tokenizers (at most 96 tokens, the fixtures' vocabulary) trained offline with `tokenizers`.

One per architecture, in the style of the real ones: GPT-2 byte-level BPE, Llama SentencePiece-like
BPE (Metaspace, <s> prepended, <unk>), BERT WordPiece (lowercasing normalizer, [CLS] ... [SEP]).
Runs give identical files (checked): BPE training is deterministic once ids are renumbered; the
WordPiece vocabulary is built directly.
"""

import json
from collections import Counter

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
        # The WordPiece trainer breaks ties in hash order (a different vocabulary each run): the vocabulary
        # is built here instead, as BERT's looks: characters, "##" characters, whole words, some suffixes.
        tok = Tokenizer(models.WordPiece(wordpiece_vocab(), unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
        trainer = None
    else:
        raise ValueError(arch)
    if trainer is not None:
        tok.train_from_iterator(CORPUS, trainer=trainer)
        tok = canonical_ids(tok)
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


def wordpiece_vocab() -> dict:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    norm = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for line in CORPUS for w, _ in pre.pre_tokenize_str(norm.normalize_str(line)))
    chars = sorted({c for w in counts for c in w})
    pieces = specials + chars + ["##" + c for c in chars] + ["##ing", "##ers", "##ics", "##ed"]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    pieces += words[: VOCAB - len(pieces)]
    return {p: i for i, p in enumerate(pieces)}


def canonical_ids(tok: Tokenizer) -> Tokenizer:
    """Renumbers the vocabulary deterministically: the trainers number the initial alphabet in hash-map
    order, which changes from run to run. Special tokens keep ids 0..n-1, then the single characters
    (with or without the "##" prefix) sorted, then the learned tokens in the order they were learned."""
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    specials = [t["content"] for t in sorted(data["added_tokens"], key=lambda t: t["id"])]
    assert [vocab[t] for t in specials] == list(range(len(specials))), specials
    rest = [t for t in sorted(vocab, key=vocab.get) if t not in specials]
    single = sorted(t for t in rest if len(t.removeprefix("##")) == 1)
    learned = [t for t in rest if len(t.removeprefix("##")) != 1]
    data["model"]["vocab"] = {t: i for i, t in enumerate(specials + single + learned)}
    return Tokenizer.from_str(json.dumps(data))


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
