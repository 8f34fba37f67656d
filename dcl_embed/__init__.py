"""The ``dcl`` command line for training, export, indexing and serving."""
