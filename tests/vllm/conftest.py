"""The vLLM plugin tests run only inside the vLLM virtualenv, through `bash scripts/vllm_env.sh`, which sets
VTPRUNE_VLLM_TESTS=1. The default suite (main environment, the newest transformers in range) does not collect
them; inside
the venv a missing or broken vLLM is an error, never a skip."""

import os

collect_ignore_glob = [] if os.environ.get("VTPRUNE_VLLM_TESTS") == "1" else ["test_*.py"]
