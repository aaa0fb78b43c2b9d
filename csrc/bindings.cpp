// Makes hetrain._C importable from Python and opens the hetrain_C op library. The Python face
// (hetrain/ops/*.py) adds fake implementations, autograd and backend selection.
#include <Python.h>
#include <torch/library.h>

// The version of the ops this extension registers, read by hetrain/_ext.py, which refuses a build whose
// version differs from its own ABI_VERSION as stale. Bump both together whenever an op is added to
// hetrain_C or an op's schema or meaning changes.
#define HETRAIN_ABI_VERSION 4

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "hetrain's compiled kernels", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  PyModule_AddIntConstant(module, "ABI_VERSION", HETRAIN_ABI_VERSION);
#ifdef HETRAIN_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
}

// The library itself; each op family declares its schemas in its own file with
// TORCH_LIBRARY_FRAGMENT(hetrain_C, m), next to its CPU implementation.
TORCH_LIBRARY(hetrain_C, m) {}
