# ccache keeps rebuilds on a 2-core machine short. The precompiled torch header needs the
# sloppiness settings below, or ccache refuses to cache any translation unit that uses it.
find_program(SDTRAIN_CCACHE ccache)
if(SDTRAIN_CCACHE)
  set(_sdtrain_launcher ${CMAKE_COMMAND} -E env
      CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
      CCACHE_BASEDIR=${CMAKE_SOURCE_DIR} ${SDTRAIN_CCACHE})
  set(CMAKE_CXX_COMPILER_LAUNCHER ${_sdtrain_launcher})
  set(CMAKE_CUDA_COMPILER_LAUNCHER ${_sdtrain_launcher})
  message(STATUS "sdtrain: using ccache (${SDTRAIN_CCACHE})")
endif()
