"""Models: the offline tiny VLM, loading from a hub id or a folder, frozen image encoders."""
