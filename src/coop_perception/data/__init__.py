"""Scenes, datasets, recordings and channel models: everything that produces or stores inputs."""
