"""Runs onnx.checker (full check) on each model given; exits non-zero on the first failure."""
import sys

import onnx

for path in sys.argv[1:]:
    onnx.checker.check_model(path, full_check=True)
    print(f"ok {path}")
