"""Data: importers, datasets, augmentation."""
