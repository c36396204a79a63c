"""``bertfast ... --help`` builds its parsers without importing torch, transformers, triton or the C++ kernels.

Those imports take seconds; the options a command takes are plain data. Checked by the modules a
fresh interpreter has loaded after printing the help, never by timing it.
"""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "triton", "bertfast._C", "tokenizers", "safetensors", "numpy")
COMMANDS = ([], ["pretrain"], ["finetune"], ["glue"], ["predict"], ["tokenizer", "train"], ["bench"])

_PROBE = """
import json, runpy, sys
heavy = json.loads(sys.argv[2])
sys.argv = ["bertfast", *json.loads(sys.argv[1]), "--help"]
try:
    runpy.run_module("bertfast", run_name="__main__")
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}),
      file=sys.stderr)
"""


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "bertfast")
def test_help_imports_no_heavy_module(command):
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(command), json.dumps(HEAVY)],
                          capture_output=True, text=True, timeout=120)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, done.stderr
    assert "usage: bertfast" in done.stdout
    assert report["loaded"] == [], f"--help of {' '.join(command) or 'bertfast'} imported {report['loaded']}"
