# ccache keeps rebuilds on a 2-core machine short, and serves a second clone of the repository
# (CI clones every submission into a new folder) from the first one's results. What that takes
# (docs/building.md has the measurements):
#  - base_dir = the repository root: ccache rewrites absolute paths under it into relative ones
#    before hashing, so -I, -include and source paths read the same from any clone;
#  - -fdebug-prefix-map from the build directory to ".": the debug information holds no
#    absolute path, and ccache hashes the mapped name instead of the working directory;
#  - the sloppiness that precompiled headers need (ccache's manual, "Precompiled headers"):
#    pch_defines, time_macros, include_file_mtime/ctime;
#  - no absolute path in any compile definition (tests/test_paths.cpp.in holds the test paths);
#  - the precompiled header hashed through a checksum of its inputs (below).
find_program(SDTRAIN_CCACHE ccache)
if(SDTRAIN_CCACHE)
  set(_sdtrain_launcher ${CMAKE_COMMAND} -E env
      CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
      CCACHE_PCH_EXTSUM=true CCACHE_BASEDIR=${CMAKE_SOURCE_DIR} ${SDTRAIN_CCACHE})
  set(CMAKE_CXX_COMPILER_LAUNCHER ${_sdtrain_launcher})
  set(CMAKE_CUDA_COMPILER_LAUNCHER ${_sdtrain_launcher})
  message(STATUS "sdtrain: using ccache (${SDTRAIN_CCACHE})")
endif()
# The source root first, the build directory last: ccache looks at the last map whose old path
# is the working directory (the build directory, wherever SDTRAIN_BUILD puts it).
add_compile_options($<$<COMPILE_LANGUAGE:CXX>:-fdebug-prefix-map=${CMAKE_SOURCE_DIR}=.>
                    $<$<COMPILE_LANGUAGE:CXX>:-fdebug-prefix-map=${CMAKE_BINARY_DIR}=.>)

# A GCC precompiled header (.gch) is a memory image that differs in every build, even of the
# same inputs, and ccache hashes the .gch of every object that uses it: in a new clone the PCH
# is rebuilt and every object would miss. With pch_external_checksum ccache hashes NAME.gch.sum
# instead, which sdtrain_write_pch_checksum writes at configure time from what the header is
# made of: the listed headers and the contents of every header under `include_dirs` (LibTorch's
# ~9,400, hashed in about a second). Flags need no place in it: they are on each object's
# command line, which ccache hashes anyway. A new LibTorch changes its CMake files, so CMake
# configures again and writes a new sum.
function(sdtrain_write_pch_checksum target headers)
  if(NOT SDTRAIN_CCACHE)
    return()
  endif()
  set(parts "${headers}")
  foreach(dir ${ARGN})
    file(GLOB_RECURSE files LIST_DIRECTORIES false RELATIVE ${dir} ${dir}/*)
    list(SORT files)
    foreach(file ${files})
      if(IS_DIRECTORY ${dir}/${file})  # a symbolic link to a folder
        continue()
      endif()
      file(SHA256 ${dir}/${file} digest)
      string(APPEND parts "\n${file} ${digest}")
    endforeach()
  endforeach()
  string(SHA256 sum "${parts}")
  set(path ${CMAKE_CURRENT_BINARY_DIR}/CMakeFiles/${target}.dir/cmake_pch.hxx.gch.sum)
  if(EXISTS ${path})
    file(READ ${path} previous)
  endif()
  if(NOT "${previous}" STREQUAL "${sum}\n")
    file(WRITE ${path} "${sum}\n")
  endif()
endfunction()
