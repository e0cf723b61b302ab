// fused_optim._C.plan_match: the per-tensor half of the optimizer's step-plan check (fused_optim/optimizer.py,
// FusedOptimizer._planned_buckets), in C.
//
//   plan_match(lists, nullable, param_dtype, grad_dtype, addresses, shapes) -> int
//
// `lists`: a list of k >= 2 lists of n entries each: the params, their grads, then the state lists the launch
// reads. An entry is a tensor, or None (a state that param does not have) in a list whose `nullable[l]` is true.
// `addresses`: k*n ints, list by list: the address (Tensor.data_ptr(), 0 for None) of every entry when the table
// was built. `shapes`: the n params' shapes (torch.Size). Returns
//   0 (MATCH)    every entry is where the table says, the params and grads are strided and contiguous with dtypes
//                `param_dtype` and `grad_dtype` (torch.dtype), and param i has shape `shapes[i]`;
//   1 (MOVED)    all of that except that some address differs: the plan holds, the table must be rebuilt;
//   2 (CHANGED)  anything else (a non-tensor, None where it may not be, a sparse grad, a tensor without storage,
//                another dtype, shape or length): the step takes the full path, which names the problem.
// Wrong argument types raise TypeError.
//
// The Python function fused_optim.optimizer._plan_match_py states the same check; tests/test_step_plan.py runs
// both on the same cases. This one exists for speed: with 1,000 small tensors an eager step is host-bound, and
// reading five attributes of each of 5,000 tensors through Python took most of a planned step's host time.
#include "plan.h"

#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>

namespace fused_optim {
namespace {

constexpr long kMatch = 0, kMoved = 1, kChanged = 2;

// A Python int as int64, or false (with the Python error cleared) when it is not one.
bool as_int64(PyObject* obj, int64_t* out) {
  const long long v = PyLong_AsLongLong(obj);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  *out = static_cast<int64_t>(v);
  return true;
}

bool same_shape(const at::Tensor& t, PyObject* shape) {
  if (!PyTuple_Check(shape)) return false;  // torch.Size is a tuple
  const auto sizes = t.sizes();
  if (PyTuple_GET_SIZE(shape) != static_cast<Py_ssize_t>(sizes.size())) return false;
  for (size_t d = 0; d < sizes.size(); ++d) {
    int64_t s = 0;
    if (!as_int64(PyTuple_GET_ITEM(shape, d), &s) || s != sizes[d]) return false;
  }
  return true;
}

// kMatch, kMoved or kChanged; throws only for a C++ error in a tensor's accessors (the caller maps it to kChanged).
long lists_match(PyObject* lists, PyObject* nullable, at::ScalarType param_dtype, at::ScalarType grad_dtype,
                 PyObject* addresses, PyObject* shapes) {
  const Py_ssize_t k = PyList_GET_SIZE(lists);
  const Py_ssize_t n = PyList_GET_SIZE(shapes);
  if (k < 2 || PyList_GET_SIZE(nullable) != k || PyList_GET_SIZE(addresses) != k * n) return kChanged;
  bool moved = false;
  for (Py_ssize_t l = 0; l < k; ++l) {
    PyObject* list = PyList_GET_ITEM(lists, l);
    if (!PyList_Check(list) || PyList_GET_SIZE(list) != n) return kChanged;
    const int may_be_none = PyObject_IsTrue(PyList_GET_ITEM(nullable, l));
    if (may_be_none < 0) {
      PyErr_Clear();
      return kChanged;
    }
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* obj = PyList_GET_ITEM(list, i);
      int64_t expected = 0;
      if (!as_int64(PyList_GET_ITEM(addresses, l * n + i), &expected)) return kChanged;
      intptr_t address = 0;
      if (obj == Py_None) {
        if (!may_be_none) return kChanged;
      } else {
        if (!THPVariable_Check(obj)) return kChanged;
        const at::Tensor& t = THPVariable_Unpack(obj);
        if (!t.defined() || t.layout() != at::kStrided || !t.has_storage()) return kChanged;
        if (l < 2) {
          if (t.scalar_type() != (l == 0 ? param_dtype : grad_dtype) || !t.is_contiguous()) return kChanged;
          if (l == 0 && !same_shape(t, PyList_GET_ITEM(shapes, i))) return kChanged;
        }
        address = reinterpret_cast<intptr_t>(t.data_ptr());
      }
      moved = moved || static_cast<int64_t>(address) != expected;
    }
  }
  return moved ? kMoved : kMatch;
}

PyObject* plan_match(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  static const char* usage = "plan_match(lists: list, nullable: list, param_dtype: torch.dtype, grad_dtype: "
                             "torch.dtype, addresses: list, shapes: list)";
  if (nargs != 6) {
    PyErr_Format(PyExc_TypeError, "%s takes 6 arguments, got %zd", usage, nargs);
    return nullptr;
  }
  PyObject *lists = args[0], *nullable = args[1], *addresses = args[4], *shapes = args[5];
  if (!PyList_Check(lists) || !PyList_Check(nullable) || !THPDtype_Check(args[2]) || !THPDtype_Check(args[3]) ||
      !PyList_Check(addresses) || !PyList_Check(shapes)) {
    PyErr_SetString(PyExc_TypeError, usage);
    return nullptr;
  }
  long result = kChanged;
  try {
    result = lists_match(lists, nullable, reinterpret_cast<THPDtype*>(args[2])->scalar_type,
                         reinterpret_cast<THPDtype*>(args[3])->scalar_type, addresses, shapes);
  } catch (const std::exception&) {
    result = kChanged;  // e.g. a tensor subclass whose data_ptr() throws: the full path decides
  }
  return PyLong_FromLong(result);
}

}  // namespace

PyMethodDef plan_methods[] = {
    {"plan_match", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plan_match)), METH_FASTCALL,
     "plan_match(lists, nullable, param_dtype, grad_dtype, addresses, shapes) -> 0 (match), 1 (moved: addresses "
     "differ) or 2 (changed): the step plan's per-tensor check (csrc/plan.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace fused_optim
