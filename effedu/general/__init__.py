"""Survey §3: general methods (checkpointing, reversible layers, sharing, pruning, ...), one module per technique.

Chapters 02–14 add their modules here; each is self-contained and imported by its notebook.
"""
