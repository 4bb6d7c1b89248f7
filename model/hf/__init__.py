"""Hugging Face export adapter: the config, modeling and tokenizer files copied into every exported TNL folder.

These files import only torch, transformers and sentencepiece (never lightspan): an exported folder is loaded
with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` on a machine without lightspan.
`pretrain/convert.py` writes the folders; nothing here is imported by the model code.
"""
from pathlib import Path

HF_DIR = Path(__file__).resolve().parent
REMOTE_CODE_FILES = ("configuration_transnormer.py", "modeling_transnormer.py", "tokenization_transnormer.py")
