"""Runnable examples of torch_cnnbp inside larger PyTorch machinery (see each module's docstring)."""
