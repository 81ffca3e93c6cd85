# Warnings and sanitizers applied to every TokenLake target through tokenlake_options.
add_library(tokenlake_options INTERFACE)
# (-Wshadow=local is GCC's only.)
target_compile_options(tokenlake_options INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic
    $<$<CXX_COMPILER_ID:GNU>:-Wshadow=local> -Wnon-virtual-dtor -Wno-missing-field-initializers>)
if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  # Clang checks the ABSL_GUARDED_BY / ABSL_EXCLUSIVE_LOCKS_REQUIRED annotations; a violation is
  # an error, whatever TOKENLAKE_WERROR says (GCC ignores the annotations).
  target_compile_options(tokenlake_options INTERFACE
    $<$<COMPILE_LANGUAGE:CXX>:-Wthread-safety -Werror=thread-safety>)
endif()
if(TOKENLAKE_WERROR)
  target_compile_options(tokenlake_options INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
endif()
if(TOKENLAKE_ASAN)
  target_compile_options(tokenlake_options INTERFACE
    $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=address,undefined -fno-omit-frame-pointer
      -fno-sanitize-recover=undefined>)
  target_link_options(tokenlake_options INTERFACE -fsanitize=address,undefined)
endif()
target_include_directories(tokenlake_options INTERFACE
  ${PROJECT_SOURCE_DIR}/src ${PROJECT_SOURCE_DIR}/include)
