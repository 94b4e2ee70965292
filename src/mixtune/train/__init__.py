"""Training: building the model, freezing, and running transformers' Trainer from a Config."""
