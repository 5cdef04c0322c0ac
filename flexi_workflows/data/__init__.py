"""Data components: turning task rows into model inputs."""
