"""Inference classes that load exported (upstream-layout) model directories."""
