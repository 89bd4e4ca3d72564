# cmake -DSDRPN_BUILD=<build> -DSDRPN_WORK=<scratch> -DTORCH_PREFIX=<Torch_DIR> -DGENERATOR=<g>
#       -DCXX=<compiler> -P check.cmake   (a single-configuration generator)
# Installs the build into a fresh prefix, builds this folder's project against it with
# find_package(sdrpn) and runs its programs: what a C++ user of sdrpn does.
file(REMOVE_RECURSE ${SDRPN_WORK})

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}")
  endif()
  message("${out}")
endfunction()

run(${CMAKE_COMMAND} --install ${SDRPN_BUILD} --prefix ${SDRPN_WORK}/prefix)
run(${CMAKE_COMMAND} -S ${CMAKE_CURRENT_LIST_DIR} -B ${SDRPN_WORK}/build -G ${GENERATOR}
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_PREFIX_PATH=${SDRPN_WORK}/prefix
    -DTorch_DIR=${TORCH_PREFIX})
run(${CMAKE_COMMAND} --build ${SDRPN_WORK}/build)
run(${SDRPN_WORK}/build/api_user)
run(${SDRPN_WORK}/build/dispatch_user)
