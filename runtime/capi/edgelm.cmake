# CMake snippet for consumers of the edgelm C API.
#   set(EDGELM_ROOT /path/to/prefix)   # where `just capi-install PREFIX` put lib/ and include/
#   include(/path/to/edgelm.cmake)
#   target_link_libraries(my_app PRIVATE edgelm::edgelm)          # shared library
#   target_link_libraries(my_fw  PRIVATE edgelm::edgelm_static)   # static archive
# ONNX Runtime itself is loaded at run time (see README): it is not a link dependency.
if(NOT EDGELM_ROOT)
  message(FATAL_ERROR "set EDGELM_ROOT to the edgelm install prefix before including edgelm.cmake")
endif()
add_library(edgelm::edgelm SHARED IMPORTED)
set_target_properties(edgelm::edgelm PROPERTIES
  IMPORTED_LOCATION "${EDGELM_ROOT}/lib/libedgelm.so"
  INTERFACE_INCLUDE_DIRECTORIES "${EDGELM_ROOT}/include")
add_library(edgelm::edgelm_static STATIC IMPORTED)
set_target_properties(edgelm::edgelm_static PROPERTIES
  IMPORTED_LOCATION "${EDGELM_ROOT}/lib/libedgelm.a"
  INTERFACE_INCLUDE_DIRECTORIES "${EDGELM_ROOT}/include"
  INTERFACE_LINK_LIBRARIES "pthread;dl;m;gcc_s")
