# One short stanza per target, in the style of abseil's absl_cc_library.
#
#   tokenlake_cc_library(NAME index SRCS prefix_tree.cc HDRS prefix_tree.h DEPS tokenlake::base)
#     -> target tokenlake_index, alias tokenlake::index
#   tokenlake_cc_test(NAME prefix_tree_test SRCS prefix_tree_test.cc DEPS tokenlake::index
#                     [LABELS slow])  # one of unit (default), slow, gpu, net
#   tokenlake_cc_benchmark(NAME prefix_tree_benchmark SRCS prefix_tree_benchmark.cc
#                          DEPS tokenlake::index)

function(tokenlake_cc_library)
  cmake_parse_arguments(TL "" "NAME" "SRCS;HDRS;DEPS" ${ARGN})
  set(target tokenlake_${TL_NAME})
  if(TL_SRCS)
    add_library(${target} STATIC ${TL_SRCS} ${TL_HDRS})
    target_link_libraries(${target} PUBLIC tokenlake_options ${TL_DEPS})
  else()
    add_library(${target} INTERFACE ${TL_HDRS})
    target_link_libraries(${target} INTERFACE tokenlake_options ${TL_DEPS})
  endif()
  add_library(tokenlake::${TL_NAME} ALIAS ${target})
endfunction()

function(tokenlake_cc_test)
  if(NOT TOKENLAKE_BUILD_TESTS)
    return()
  endif()
  cmake_parse_arguments(TL "" "NAME;TIMEOUT" "SRCS;DEPS;LABELS" ${ARGN})
  if(NOT TL_LABELS)
    set(TL_LABELS unit)
  endif()
  # CMake 3.25's gtest_discover_tests flattens list-valued properties, so a second label would
  # silently become a bogus property: one label per test (unit, slow, gpu or net).
  list(LENGTH TL_LABELS num_labels)
  if(num_labels GREATER 1)
    message(FATAL_ERROR "tokenlake_cc_test(${TL_NAME}): give one label, not '${TL_LABELS}'")
  endif()
  if(NOT TL_TIMEOUT)
    set(TL_TIMEOUT 600)
  endif()
  add_executable(${TL_NAME} ${TL_SRCS})
  target_link_libraries(${TL_NAME} PRIVATE tokenlake_options ${TL_DEPS} GTest::gmock GTest::gtest_main)
  gtest_discover_tests(${TL_NAME}
    DISCOVERY_MODE PRE_TEST
    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR}
    PROPERTIES LABELS "${TL_LABELS}" TIMEOUT ${TL_TIMEOUT}
               ENVIRONMENT "TOKENLAKE_SOURCE_DIR=${PROJECT_SOURCE_DIR}")
endfunction()

function(tokenlake_cc_benchmark)
  if(NOT TOKENLAKE_BUILD_BENCHMARKS)
    return()
  endif()
  cmake_parse_arguments(TL "" "NAME" "SRCS;DEPS" ${ARGN})
  add_executable(${TL_NAME} ${TL_SRCS})
  target_link_libraries(${TL_NAME} PRIVATE tokenlake_options ${TL_DEPS} benchmark::benchmark_main)
endfunction()
