"""Decoding media: video (and later audio) references into what processors take."""
