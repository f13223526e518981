"""Data: importers, the demo generator, caption corpora."""
