"""Dense-to-mixture-of-experts conversion. Not implemented yet."""
