"""Data: importers, datasets, augmentation, caption corpora."""
