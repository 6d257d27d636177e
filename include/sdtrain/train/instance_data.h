#pragma once
// The instance folder in the SageMaker JumpStart / diffusers DreamBooth layout: photos
// (png/jpg/jpeg) plus dataset_info.json {"instance_prompt": ..., "class_prompt": ...}.

#include <filesystem>
#include <string>
#include <vector>

namespace sdtrain::train {

struct DatasetInfo {
  std::string instance_prompt;
  std::string class_prompt;  // empty when the file has none
};

// Reads <dir>/dataset_info.json. Throws InputDataError naming the file and the fix.
DatasetInfo read_dataset_info(const std::filesystem::path& instance_dir);

// Image files of a folder (png/jpg/jpeg, any case), sorted by name so that runs are
// reproducible. Throws InputDataError when the folder is missing.
std::vector<std::filesystem::path> list_images(const std::filesystem::path& dir);

struct ImageSummary {
  std::filesystem::path path;
  int width = 0;
  int height = 0;
};

// Decodes every image (EXIF applied). Unreadable files are all listed in one InputDataError;
// an empty folder is an error too.
std::vector<ImageSummary> check_images(const std::filesystem::path& dir);

}  // namespace sdtrain::train
