// fastctx._C_cuda: the CUDA kernels, built as a module of their own so that a
// failed CUDA build never takes the CPU kernels (fastctx._C) with it.
//
// Importing this module runs the TORCH_LIBRARY_IMPL(fastctx, CUDA, m)
// initialisers of csrc/cuda/<op>.cu. The schemas they implement are defined
// in fastctx._C (csrc/fastctx.cpp), which fastctx/_backend.py imports first.
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C_cuda", "fastctx CUDA kernels (see torch.ops.fastctx)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
