// The Python functions of the extension module fused_optim._C (ops.cpp creates the module); see plan.cpp.
#pragma once

#include <Python.h>

namespace fused_optim {

extern PyMethodDef plan_methods[];  // plan_match; terminated by a null entry

}  // namespace fused_optim
