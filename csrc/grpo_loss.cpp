#include <pybind11/pybind11.h>
void register_grpo_loss(pybind11::module_& m) {}
