"""The bottom layer for files: atomic writes (atomic.py), append-only JSONL stores (jsonl.py), content digests
(digests.py) and the redaction of credentials (redaction.py). It imports nothing else from deepalign."""
