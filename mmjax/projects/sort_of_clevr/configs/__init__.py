"""The Sort-of-CLEVR project's configs (loaded by path: `--config <this folder>/vqa.py`)."""
