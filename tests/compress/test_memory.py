"""Streaming keeps peak memory flat in the number of layers (the property benchmarks/memory_1b.py
measures at 1B parameters): a model with 8x the layers must not need noticeably more memory."""

import subprocess
import sys

import pytest

from tests.conftest import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.slow


def peak_rss_mb(model_dir, out):
    """Peak resident memory of a streamed GPTQ run in a fresh process. The peak is reset first:
    Linux carries a process's high-water mark over fork and exec, so it would start at this
    (test) process's size."""
    script = (
        "import re, compress; "
        "open('/proc/self/clear_refs', 'w').write('5'); "
        f"compress.run({{'model': {str(model_dir)!r}, 'eval': None, 'output': {str(out)!r}, "
        "'calibration': {'samples': 2, 'seq_len': 64}, "
        "'steps': [{'method': 'gptq', 'bits': 4, 'group_size': 128}]}); "
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(proc.stdout.split()[-1]) / 1024


def test_peak_memory_does_not_grow_with_layers(tmp_path):
    tok = tiny_tokenizer()
    peaks = {}
    for layers in (4, 32):
        # hidden 512: 9.4 MB of float32 weights per layer, so 32 layers hold 264 MB more than 4
        model = tiny_model(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=2)
        model.save_pretrained(tmp_path / f"m{layers}")
        tok.save_pretrained(tmp_path / f"m{layers}")
        del model
        peaks[layers] = peak_rss_mb(tmp_path / f"m{layers}", tmp_path / f"o{layers}")
    # measured 4 layers 527 MB, 32 layers 581 MB (+54 MB); holding the model whole would add +264 MB
    assert peaks[32] - peaks[4] < 110, peaks
