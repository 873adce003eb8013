"""Retrieval augmentation for compressed models. Sits beside the stack: the core never imports it. Not implemented yet."""
