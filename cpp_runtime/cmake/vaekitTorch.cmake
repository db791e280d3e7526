# Torch's imported targets, tidied: used by cpp_runtime/CMakeLists.txt and by the installed vaekitConfig.cmake.

# torch's caffe2::mkl target names ${MKL_ROOT}/lib/intel64, .../intel64_win and .../win-x64 as link directories even
# where there is no MKL (the torch wheel: /lib/intel64 ...), and CMake writes them into the RPATH of every program
# that links torch. Keep only the directories that exist.
function(vaekit_drop_missing_link_directories)
  if(NOT TARGET caffe2::mkl)
    return()
  endif()
  get_target_property(directories caffe2::mkl INTERFACE_LINK_DIRECTORIES)
  if(NOT directories)
    return()
  endif()
  set(existing "")
  foreach(directory IN LISTS directories)
    if(IS_DIRECTORY "${directory}")
      list(APPEND existing "${directory}")
    endif()
  endforeach()
  set_property(TARGET caffe2::mkl PROPERTY INTERFACE_LINK_DIRECTORIES "${existing}")
endfunction()
