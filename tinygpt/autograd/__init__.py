"""The engine: `tensor` (`Tensor`, `Function`, the iterative backward, `no_grad`), the primitive
ops (`ops`), the kernel-backed ops (`fused`), the functional API that also gives `Tensor` its
operators (`functional`), and float64 central differences (`gradcheck`)."""
