"""Text side of the data: a character tokenizer (id 0 reserved) and a sentence generator."""
from __future__ import annotations

import json
import random
import re
import unicodedata
from typing import Iterable, List

#: lowercase letters, space and apostrophe: what the synthesized sets and LibriSpeech use.
DEFAULT_ALPHABET = " abcdefghijklmnopqrstuvwxyz'"


class CharTokenizer:
    """Characters <-> ids. Id 0 is reserved for pad, start and end (the zero token).

    Text is normalised before encoding: NFKD, accents stripped, lowercased, every character
    outside the alphabet becomes a space, runs of spaces collapse. ``ids = tokenizer.encode(s)``
    never contains 0; ``decode`` stops at the first 0.
    """

    PAD = START = END = 0

    def __init__(self, alphabet: str = DEFAULT_ALPHABET):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated characters")
        if " " not in alphabet:
            raise ValueError("alphabet must contain the space")
        self.alphabet = alphabet
        self._id = {c: i + 1 for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 1

    def normalize(self, text: str) -> str:
        text = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in text if not unicodedata.combining(c))
        if self.alphabet == self.alphabet.lower():
            text = text.lower()
        text = "".join(c if c in self._id else " " for c in text)
        return re.sub(r" +", " ", text).strip()

    def encode(self, text: str) -> List[int]:
        return [self._id[c] for c in self.normalize(text)]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == 0:
                break
            if 1 <= i <= len(self.alphabet):
                out.append(self.alphabet[i - 1])
        return "".join(out)

    def to_json(self) -> str:
        return json.dumps({"alphabet": self.alphabet})

    @classmethod
    def from_json(cls, s: str) -> "CharTokenizer":
        return cls(json.loads(s)["alphabet"])

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
        """A tokenizer over the (lowercased) characters that occur in ``texts``."""
        chars = set(" ")
        for t in texts:
            chars.update(t.lower())
        chars.discard("\n")
        chars.discard("\t")
        return cls("".join(sorted(chars)))


# ------------------------------------------------------------------------------------
# sentence generator: a few hundred common words in simple grammatical frames
# ------------------------------------------------------------------------------------
_NOUNS = """dog cat bird fish horse cow sheep goat mouse rabbit fox wolf bear lion tiger
duck frog snake child man woman boy girl friend teacher doctor farmer baker driver singer
painter sailor king queen student neighbor house garden river lake hill mountain forest
field road street bridge city village school market shop kitchen table chair window door
floor wall roof bed book letter pen paper box bag cup plate bowl spoon knife bottle glass
apple bread cake cheese milk water tea coffee soup egg rice corn orange lemon carrot onion
tree flower leaf grass stone sand rock cloud rain snow wind sun moon star sky sea ship boat
train car bus bicycle plane clock watch phone radio picture song story game ball kite hat
coat shoe shirt dress ring key map lamp candle fire night morning evening winter summer""".split()
_ADJECTIVES = """big small little old young new red blue green yellow black white brown
happy sad quiet loud fast slow warm cold hot soft hard bright dark heavy light tall short
long round clean dirty kind brave clever busy lazy gentle strange quick calm wild sweet
fresh empty full rich poor funny tiny huge early late lovely simple rough smooth""".split()
_VERBS_T = """sees finds likes wants needs holds takes makes brings buys sells opens closes
carries paints draws reads writes cleans watches follows visits helps calls meets moves
pushes pulls fixes washes cooks eats drinks loves hates remembers forgets catches throws
keeps leaves""".split()
_VERBS_I = """sleeps runs walks sings laughs waits sits stands swims jumps dances smiles
cries works plays talks listens falls rests travels returns""".split()
_ADVERBS = """quickly slowly quietly loudly happily sadly gently carefully often always
never sometimes today tomorrow again soon later early""".split()
_PREPS = """in on under over near behind beside across through into from with without
around after before""".split()
_DETS = """the a this that my your his her our their every some one""".split()
_NAMES = """anna ben clara david emma frank grace henry iris jack kate leo mary nick olga
peter rosa sam tom una victor wendy""".split()

VOCABULARY = sorted(set(_NOUNS + _ADJECTIVES + _VERBS_T + _VERBS_I + _ADVERBS + _PREPS
                        + _DETS + _NAMES + ["and", "but", "then", "because", "while", "is",
                                            "was", "very"]))


class SentenceGenerator:
    """Random simple English sentences over :data:`VOCABULARY` (a few hundred words)."""

    def __init__(self, seed: int = 0, min_words: int = 3, max_words: int = 14):
        self.rng = random.Random(seed)
        self.min_words, self.max_words = min_words, max_words

    def _np(self) -> List[str]:
        r = self.rng
        if r.random() < 0.15:
            return [r.choice(_NAMES)]
        words = [r.choice(_DETS)]
        if r.random() < 0.5:
            words.append(r.choice(_ADJECTIVES))
        words.append(r.choice(_NOUNS))
        return words

    def _clause(self) -> List[str]:
        r = self.rng
        words = self._np()
        kind = r.random()
        if kind < 0.45:
            words += [r.choice(_VERBS_T)] + self._np()
        elif kind < 0.75:
            words += [r.choice(_VERBS_I)]
            if r.random() < 0.5:
                words += [r.choice(_PREPS)] + self._np()
        else:
            words += [r.choice(["is", "was"])]
            if r.random() < 0.3:
                words.append("very")
            words.append(r.choice(_ADJECTIVES))
        if r.random() < 0.3:
            words.append(r.choice(_ADVERBS))
        return words

    def sentence(self) -> str:
        r = self.rng
        for _ in range(100):
            words = self._clause()
            if r.random() < 0.3:
                words += [r.choice(["and", "but", "then", "because", "while"])] + self._clause()
            if self.min_words <= len(words) <= self.max_words:
                return " ".join(words)
        return " ".join(words[: self.max_words])

    def sentences(self, n: int) -> List[str]:
        return [self.sentence() for _ in range(n)]


__all__ = ["CharTokenizer", "SentenceGenerator", "VOCABULARY", "DEFAULT_ALPHABET"]
