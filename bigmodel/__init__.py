"""bigmodel: from raw data to a deployed, verified ONNX model, driven by YAML configs.

Importing the package is cheap on purpose: torch is imported only by the stages that need it, so
`bigmodel --help`, `config` and `infer` start fast and `infer` runs without PyTorch installed.
"""

__version__ = "0.1.0"
