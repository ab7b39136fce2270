"""bigmodel: from raw data to a deployed, verified ONNX model, driven by YAML configs.

Importing the package is cheap on purpose: torch is imported only by the stages that need it, so
`bigmodel --help`, `config` and `infer` start fast and `infer` runs without PyTorch installed.
"""

import os

__version__ = "0.1.0"

# Large tensors on transparent huge pages (PyTorch's CPU allocator reads this at its first allocation):
# the streaming stages allocate, fill and free a fresh buffer per weight, and 4 KiB page faults were a
# third of converting bf16 to fp32 (2.3x faster so, AMD EPYC Zen 4; docs/big-models.md). A user's own
# setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
