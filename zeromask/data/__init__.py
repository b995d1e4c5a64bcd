"""Speech data: character tokenizer, wav+txt / LibriSpeech loaders, espeak-ng synthesis."""
from .loaders import (AUDIO_EXTS, IGNORE_INDEX, SpeechDataset, Utterance, collate,
                      find_utterances, load_folder, load_librispeech)
from .synth import EspeakNotFound, espeak_binary, make_dataset, split_voices, voices
from .text import DEFAULT_ALPHABET, VOCABULARY, CharTokenizer, SentenceGenerator

__all__ = ["CharTokenizer", "SentenceGenerator", "VOCABULARY", "DEFAULT_ALPHABET",
           "Utterance", "find_utterances", "load_folder", "load_librispeech", "SpeechDataset",
           "collate", "IGNORE_INDEX", "AUDIO_EXTS", "make_dataset", "voices", "split_voices",
           "espeak_binary", "EspeakNotFound"]
