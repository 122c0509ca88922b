"""The supervisor process: configuration, shared-memory channel, loader lifecycle."""
