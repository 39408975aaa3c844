"""Backend ``torch``: vectorised PyTorch, the CPU path without the C++ build and the fallback on any device."""
