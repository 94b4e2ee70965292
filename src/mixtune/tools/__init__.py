"""Tools around training: tiny checkpoints, demo data, the demo itself."""
