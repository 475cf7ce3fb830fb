import os

import torch


def test_interpreter_env_set_before_triton():
    if not torch.cuda.is_available():
        assert os.environ["TRITON_INTERPRET"] == "1"
