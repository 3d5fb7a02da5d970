"""Three small plugins that exercise every seam the real MoE, draft-head and compressor plugins use.

Not shipped features: tests register them through the `slimtrain.plugins` entry-point group
(`tests/plugins/conftest.py`), as a third-party package would.
"""
