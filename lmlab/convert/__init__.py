"""Pretrained weights in and out: Hugging Face directories, GGUF files, lmlab Orbax exports."""
from lmlab.convert.hf import load_hf, save_hf
