import os

# The Triton interpreter must be chosen before triton is first imported: with no GPU, Triton kernels
# run under the interpreter on CPU tensors.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def device_under_test():
    return os.environ.get("HIERKERN_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


def kernel_backends():
    """(impl, device) pairs to test on this machine."""
    pairs = [("cpu", "cpu")]
    try:
        import triton  # noqa: F401
        if torch.cuda.is_available():
            pairs.append(("triton", "cuda"))
        elif os.environ.get("TRITON_INTERPRET") == "1":
            pairs.append(("triton", "cpu"))
    except ImportError:
        pass
    return pairs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
