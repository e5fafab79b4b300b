"""Public ops. Each module: Triton kernels + launchers + autograd.Function + public function."""

__all__: list[str] = []
