# Writes ptxas' resource report (-Xptxas -v: registers, spill stores/loads, stack, shared
# memory per kernel) of one .cu file for one architecture to OUT. Run by CMakeLists.txt at
# build time (cmake -P, so no shell redirection is needed); tests/test_cuda_compile.py reads
# the report the build left and recompiles the source itself to assert on the same numbers.
# Inputs: NVCC, ARCH (e.g. 90), SRC, INCLUDE_DIR, SRC_DIR, OUT; optional CCACHE and BASEDIR. The
# flags are CMakeLists.txt's CUDA flags (-O3 --expt-relaxed-constexpr, C++17).
# It compiles to an object (-c) so that ccache, where CMakeLists.txt uses it, can cache the
# compile: ccache stores the compiler's stderr with the object and replays it on a hit, so an
# unchanged source gives the same report in no time (it was ~8 s of every fresh build); the
# report is the ptxas output of that identical compile. tests/test_cuda_compile.py compiles the
# source itself with the same flags (through ccache too, where installed).
set(_args -std=c++17 -O3 --expt-relaxed-constexpr -I${INCLUDE_DIR} -I${SRC_DIR} -arch=sm_${ARCH}
          -Xptxas -v -c -o ${OUT}.o)
set(_launch "")
if(CCACHE)
  set(_launch ${CMAKE_COMMAND} -E env CCACHE_BASEDIR=${BASEDIR} CCACHE_NOHASHDIR=1 ${CCACHE})
endif()
execute_process(COMMAND ${_launch} ${NVCC} ${_args} ${SRC}
                RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
file(WRITE ${OUT} "${_err}${_out}")
file(REMOVE ${OUT}.o)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "ptxas report for sm_${ARCH} failed (nvcc exit ${_rc}):\n${_err}")
endif()
