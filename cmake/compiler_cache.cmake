# ccache keeps rebuilds on a 2-core machine short, and serves a second clone of the repository
# (CI clones every submission into a new folder) from the first one's results. What that takes
# (docs/building.md has the measurements):
#  - base_dir = the repository root: ccache rewrites absolute paths under it into relative ones
#    before hashing, so -I, -include and source paths read the same from any clone;
#  - -fdebug-prefix-map from the build directory to ".": the debug information holds no
#    absolute path, and ccache hashes the mapped name instead of the working directory;
#  - the sloppiness that precompiled headers need (ccache's manual, "Precompiled headers"):
#    pch_defines, time_macros, include_file_mtime/ctime;
#  - no absolute path in any compile definition (tests/test_paths.cpp.in holds the test paths).
find_program(SDTRAIN_CCACHE ccache)
if(SDTRAIN_CCACHE)
  set(_sdtrain_launcher ${CMAKE_COMMAND} -E env
      CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
      CCACHE_BASEDIR=${CMAKE_SOURCE_DIR} ${SDTRAIN_CCACHE})
  set(CMAKE_CXX_COMPILER_LAUNCHER ${_sdtrain_launcher})
  set(CMAKE_CUDA_COMPILER_LAUNCHER ${_sdtrain_launcher})
  message(STATUS "sdtrain: using ccache (${SDTRAIN_CCACHE})")
endif()
# The source root first, the build directory last: ccache looks at the last map whose old path
# is the working directory (the build directory, wherever SDTRAIN_BUILD puts it).
add_compile_options($<$<COMPILE_LANGUAGE:CXX>:-fdebug-prefix-map=${CMAKE_SOURCE_DIR}=.>
                    $<$<COMPILE_LANGUAGE:CXX>:-fdebug-prefix-map=${CMAKE_BINARY_DIR}=.>)
