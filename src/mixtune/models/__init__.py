"""Model families: what differs between checkpoints, one small file each, found by `model_type`."""
