"""Data: dataset yamls, image discovery and label checks, loading, augmentation, sources and downloads."""
