"""Test-suite set-up shared by every test module.

The environment variables are set here, before anything imports triton or transformers:
Triton kernels run under the interpreter on the CPU, and nothing may touch a model hub.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests import strategies  # noqa: E402  (registers and loads the hypothesis profiles)

strategies.load_profile()
