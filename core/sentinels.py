"""The values that mark what a batch position is not: padding (no document) and no label."""

IGNORE_INDEX = -100
"""labels value of a position that takes no loss (padding, the last token of a document)."""

PAD_DOC_ID = -1
"""doc_ids value of a padding position."""
