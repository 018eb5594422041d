"""Data: document sources, tokenizers, and the packed, resumable batch pipeline."""
from lmlab.data.pipeline import BatchIterator, corpus_fingerprint, make_batches, to_global
from lmlab.data.tokenizers import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer, check_vocab,
                                   tokenizer_from_config, train_bpe)
