// fused_optim._C.plan_match: the per-tensor half of the optimizer's step-plan check (fused_optim/optimizer.py,
// FusedOptimizer._planned_buckets), in C.
//
//   plan_match(params, states, names, present, param_dtype, grad_dtype, addresses, shapes, state_dtype, numels,
//              found, device, dense_layouts) -> (result, grads)
//
// One bucket of n params: `params` (list of n tensors), `states` (list of their n state dicts), `names` (list of k
// str: the state keys the launch reads, in table order), `present` (list of k: True when every param has that
// state, else a tuple of n bools saying which do), `param_dtype` and `grad_dtype` (torch.dtype), `addresses`
// (an int64 buffer, array.array('q'), of (2 + k) * n entries, operand by operand: the params, their grads, then each
// state in `names` order; 0 for a state a param does not have) and `shapes` (the n params' torch.Size) as they were
// when the table was built, `state_dtype` (torch.dtype: every state tensor's) and `numels` (an int64 buffer of
// k * n entries in the order of the states' addresses: the elements the kernels read of each state tensor, -1 where
// none are read or the param has no such state), and `found`, a writable int64 buffer of the length of
// `addresses`, into which the addresses read are written in the same order (what a MOVED bucket's new table
// holds), `device` (torch.device: the bucket's, which every tensor read must be on), and `dense_layouts` (bool:
// the rule's kernels take params of any dense layout, csrc/layout.h; else contiguous params only). Each param's grad
// is read here (Tensor.grad, in C++), each state from its dict. Returns
//   (0, grads)   MATCH: every param is a plain tensor (torch.Tensor or nn.Parameter, strided, contiguous or, with
//                `dense_layouts`, non-overlapping and dense) of dtype `param_dtype` and shape `shapes[i]`, its grad a
//                strided tensor of dtype `grad_dtype`, the same shape and laid out like it (layout.h),
//                every state dict holds exactly the states `present` says and each is a strided tensor of dtype
//                `state_dtype` and the size in `numels`, laid out as layout.h's `laid_out` asks, every one of these
//                tensors is on `device`, and every address is the one in `addresses`;
//                `grads` is the list of the n grads;
//   (1, grads)   MOVED: all of that except that some address differs: the plan holds, the table takes the addresses
//                in `found` (tables.with_addresses);
//   (2, None)    CHANGED: anything else (a missing grad, a sparse grad, a non-tensor, a state that appeared or went,
//                a tensor without storage, another dtype, shape, size, layout, device or length; a tensor moved to
//                another device has a new address too, and a table must not take it): the step takes the full
//                path, which names the problem. A state tensor's size and dtype are read although its address is
//                unchanged: a tensor at the address of a freed one, a view of another dtype or resize_() keep it.
// Wrong argument types raise TypeError.
//
// The Python function fused_optim.optimizer._plan_match_py states the same check; tests/test_step_plan.py runs
// both on the same cases. This one exists for speed: with 1,000 small tensors an eager step is host-bound, and
// reading the grads and five attributes of each of 5,000 tensors through Python took most of a planned step's
// host time.
#include "plan.h"

#include <cstring>

#include "layout.h"

#include <torch/csrc/Device.h>
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

// The address of a tensor the kernels read through the table, or false when it cannot be one (not strided, without
// storage, or not on the bucket's `device`).
bool strided_address(const at::Tensor& t, const at::Device& device, int64_t* out) {
  if (!t.defined() || t.layout() != at::kStrided || !t.has_storage() || t.device() != device) return false;
  *out = static_cast<int64_t>(reinterpret_cast<intptr_t>(t.data_ptr()));
  return true;
}

// Walks an int64 buffer (the expected addresses, or the state sizes) in table order.
class Int64s {
 public:
  explicit Int64s(const int64_t* data) : data_(data) {}
  int64_t next() { return data_[at_++]; }

 private:
  const int64_t* data_;
  Py_ssize_t at_ = 0;
};

// Walks the expected addresses and the buffer of those found, in table order.
class AddressWalk {
 public:
  AddressWalk(const int64_t* expected, int64_t* found) : expected_(expected), found_(found) {}
  // Records `address`; true when it is the expected one.
  bool next(int64_t address) {
    found_[at_] = address;
    return expected_[at_++] == address;
  }

 private:
  const int64_t* expected_;
  int64_t* found_;
  Py_ssize_t at_ = 0;
};

// kMatch, kMoved or kChanged, with the grads appended to `grads` (a new list of n) unless kChanged; throws only for
// a C++ error in a tensor's accessors (the caller maps it to kChanged).
long bucket_match(PyObject* params, PyObject* states, PyObject* names, PyObject* present, at::ScalarType param_dtype,
                  at::ScalarType grad_dtype, const Py_buffer& addresses, PyObject* shapes, at::ScalarType state_dtype,
                  const Py_buffer& numels, const Py_buffer& found, const at::Device& device, bool dense_layouts,
                  PyObject* grads) {
  const Py_ssize_t n = PyList_GET_SIZE(shapes), k = PyList_GET_SIZE(names);
  constexpr auto word = static_cast<Py_ssize_t>(sizeof(int64_t));
  if (PyList_GET_SIZE(params) != n || PyList_GET_SIZE(states) != n || PyList_GET_SIZE(present) != k ||
      addresses.len != (2 + k) * n * word || numels.len != k * n * word || found.len != addresses.len)
    return kChanged;
  bool moved = false;
  AddressWalk expected(static_cast<const int64_t*>(addresses.buf), static_cast<int64_t*>(found.buf));
  Int64s sizes(static_cast<const int64_t*>(numels.buf));
  // The params, then their grads (two walks over the list, to keep the table's order).
  for (int pass = 0; pass < 2; ++pass) {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* obj = PyList_GET_ITEM(params, i);
      // Only plain tensors: a subclass could give `.grad` another meaning in Python than in C++.
      if (!THPVariable_CheckExact(obj)) return kChanged;
      const at::Tensor& p = THPVariable_Unpack(obj);
      int64_t address = 0;
      if (pass == 0) {
        if (!strided_address(p, device, &address) || p.scalar_type() != param_dtype ||
            !(p.is_contiguous() || (dense_layouts && p.is_non_overlapping_and_dense())) ||
            !same_shape(p, PyList_GET_ITEM(shapes, i)))
          return kChanged;
      } else {
        const at::Tensor& g = p.grad();
        // The grad's shape too: autograd keeps it equal to the param's, but `grad.data = ...` and resize_() do not.
        if (!strided_address(g, device, &address) || g.scalar_type() != grad_dtype || g.sizes() != p.sizes() ||
            !laid_out_like(g, p))
          return kChanged;
        PyObject* wrapped = THPVariable_Wrap(g);  // the grad's Python object (new reference)
        if (wrapped == nullptr) {
          PyErr_Clear();
          return kChanged;
        }
        PyList_SET_ITEM(grads, i, wrapped);  // steals the reference
      }
      moved = !expected.next(address) || moved;
    }
  }
  // The states, name by name.
  for (Py_ssize_t j = 0; j < k; ++j) {
    PyObject* name = PyList_GET_ITEM(names, j);
    PyObject* has = PyList_GET_ITEM(present, j);
    const bool everyone = has == Py_True;
    if (!everyone && (!PyTuple_Check(has) || PyTuple_GET_SIZE(has) != n)) return kChanged;
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* state = PyList_GET_ITEM(states, i);
      if (!PyDict_Check(state)) return kChanged;
      PyObject* value = PyDict_GetItemWithError(state, name);  // borrowed
      if (value == nullptr && PyErr_Occurred()) {
        PyErr_Clear();
        return kChanged;
      }
      const bool in_dict = value != nullptr && value != Py_None;
      int wanted = everyone ? 1 : PyObject_IsTrue(PyTuple_GET_ITEM(has, i));
      if (wanted < 0) {
        PyErr_Clear();
        return kChanged;
      }
      if (in_dict != static_cast<bool>(wanted)) return kChanged;  // a state appeared or went: lazy init decides
      int64_t address = 0;
      const int64_t size = sizes.next();
      if (in_dict) {
        if (!THPVariable_Check(value)) return kChanged;
        const at::Tensor& t = THPVariable_Unpack(value);
        const at::Tensor& p = THPVariable_Unpack(PyList_GET_ITEM(params, i));  // an exact tensor: checked above
        if (!strided_address(t, device, &address) || t.scalar_type() != state_dtype || !laid_out(t, p) ||
            (size >= 0 && t.numel() != size))
          return kChanged;
      }
      moved = !expected.next(address) || moved;
    }
  }
  return moved ? kMoved : kMatch;
}

// A buffer of int64 (array.array('q')), read in place rather than one Python int at a time; released on scope exit.
class Int64Buffer {
 public:
  // False (with no Python error set) when `obj` is not a C-contiguous (and, if asked, writable) buffer of int64.
  bool get(PyObject* obj, bool writable = false) {
    if (PyObject_GetBuffer(obj, &view_, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) != 0) {
      PyErr_Clear();
      return false;
    }
    held_ = true;
    const char* format = view_.format == nullptr ? "" : view_.format;
    if (*format == '@' || *format == '=') ++format;  // native byte order, as 'q' alone
    return view_.itemsize == sizeof(int64_t) && (std::strcmp(format, "q") == 0 || std::strcmp(format, "l") == 0);
  }
  const Py_buffer& view() const { return view_; }
  ~Int64Buffer() {
    if (held_) PyBuffer_Release(&view_);
  }

 private:
  Py_buffer view_{};
  bool held_ = false;
};

PyObject* plan_match(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  static const char* usage = "plan_match(params: list, states: list, names: list, present: list, param_dtype: "
                             "torch.dtype, grad_dtype: torch.dtype, addresses: array('q'), shapes: list, "
                             "state_dtype: torch.dtype, numels: array('q'), found: array('q'), writable, "
                             "device: torch.device, dense_layouts: bool)";
  if (nargs != 13) {
    PyErr_Format(PyExc_TypeError, "%s takes 13 arguments, got %zd", usage, nargs);
    return nullptr;
  }
  PyObject *params = args[0], *states = args[1], *names = args[2], *present = args[3], *shapes = args[7];
  Int64Buffer addresses, numels, found;
  if (!PyList_Check(params) || !PyList_Check(states) || !PyList_Check(names) || !PyList_Check(present) ||
      !THPDtype_Check(args[4]) || !THPDtype_Check(args[5]) || !PyList_Check(shapes) || !THPDtype_Check(args[8]) ||
      !addresses.get(args[6]) || !numels.get(args[9]) || !found.get(args[10], /*writable=*/true) ||
      !THPDevice_Check(args[11]) || !PyBool_Check(args[12])) {
    PyErr_SetString(PyExc_TypeError, usage);
    return nullptr;
  }
  PyObject* grads = PyList_New(PyList_GET_SIZE(shapes));  // filled with new references as the grads are read
  if (grads == nullptr) return nullptr;
  long result = kChanged;
  try {
    const auto dtype = [&](int at) { return reinterpret_cast<THPDtype*>(args[at])->scalar_type; };
    result = bucket_match(params, states, names, present, dtype(4), dtype(5), addresses.view(), shapes, dtype(8),
                          numels.view(), found.view(), reinterpret_cast<THPDevice*>(args[11])->device,
                          args[12] == Py_True, grads);
  } catch (const std::exception&) {
    result = kChanged;  // e.g. a tensor whose data_ptr() throws: the full path decides
  }
  if (result == kChanged) {
    Py_DECREF(grads);  // PyList's dealloc skips the slots still NULL
    return Py_BuildValue("(lO)", result, Py_None);
  }
  return Py_BuildValue("(lN)", result, grads);  // N: the tuple takes our reference
}

}  // namespace

PyMethodDef plan_methods[] = {
    {"plan_match", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plan_match)), METH_FASTCALL,
     "plan_match(params, states, names, present, param_dtype, grad_dtype, addresses, shapes, state_dtype, numels, "
     "found, device, dense_layouts) -> (0, grads) (match), (1, grads) (moved: addresses differ, the new ones in found) or (2, None) "
     "(changed): the step plan's per-tensor check (csrc/plan.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace fused_optim
