"""Import-only stand-in for Hugging Face ``datasets``, used by bench/serving/sglang_client.py only where the real
package is not installed: SGLang's benchmark package imports ``load_dataset`` at module level for its MMMU loader, and
the runner never asks for MMMU. Anything that does call it gets this error, not a silent fake."""


def load_dataset(*args, **kwargs):
    raise RuntimeError(
        "Hugging Face 'datasets' is not installed (this is kvdrive's bench/serving/shim): "
        "pip install datasets to use SGLang's MMMU benchmark dataset"
    )
