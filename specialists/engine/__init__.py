"""The training engine: the one resumable fit loop, its steps and teachers, the training
recipes, and the one timing protocol."""
