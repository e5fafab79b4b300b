// Placeholder until the per-task accumulation op lands (issue 4); replaced by its glue.
#include <pybind11/pybind11.h>
void register_task_accumulate(pybind11::module_& m) {}
