"""Quantization methods: configs, pure tensor math and the packed module format."""
