"""Data: parquet shards, corpus preparation, features and streaming batches with upstream's key names."""
