"""Speech data: character tokenizer, wav+txt / LibriSpeech loaders, synthesis (espeak-ng, flite,
festival) and augmentation."""
from .loaders import (AUDIO_EXTS, IGNORE_INDEX, SpeechDataset, Utterance, change_tempo,
                      collate, find_utterances, load_folder, load_librispeech)
from .augment import add_noise, colored_noise, reverberate, synthetic_rir
from .synth import (ENGINES, EngineNotFound, EspeakNotFound, FestivalNotFound, FliteNotFound,
                    espeak_binary, get_engine, make_dataset, manifest_labels, render,
                    split_voices, voices)
from .text import DEFAULT_ALPHABET, VOCABULARY, CharTokenizer, SentenceGenerator

__all__ = ["CharTokenizer", "SentenceGenerator", "VOCABULARY", "DEFAULT_ALPHABET",
           "Utterance", "find_utterances", "load_folder", "load_librispeech", "SpeechDataset",
           "collate", "change_tempo", "IGNORE_INDEX", "AUDIO_EXTS", "make_dataset", "manifest_labels", "voices", "split_voices",
           "espeak_binary", "EspeakNotFound", "EngineNotFound", "FliteNotFound",
           "FestivalNotFound", "ENGINES", "get_engine", "render", "add_noise", "colored_noise",
           "reverberate", "synthetic_rir"]
