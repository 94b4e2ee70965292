"""The multimodal data pipeline: data file -> Conversation -> Encoded -> batch."""
