"""Export to Hugging Face format and import from it: the writer (hf.py), the checkpoint reader
(consolidate.py), the adapter mapping (mapping.py), `--verify` (verify.py) and `init_from_hf` (importer.py).

The architecture adapters live in `slimtrain.modules.hf_adapters`, where plugins can register theirs.
"""
