"""MiniMonkey (InternVL2 with multi-scale adaptive cropping): its image cropping and processor."""
