#include "sdtrain/train/instance_data.h"

#include <algorithm>

#include "sdtrain/io/image.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/json.h"

namespace sdtrain::train {
namespace fs = std::filesystem;

DatasetInfo read_dataset_info(const fs::path& instance_dir) {
  fs::path path = instance_dir / "dataset_info.json";
  if (!fs::exists(path)) {
    throw InputDataError(path.string() + ": file not found; create it with "
                         "{\"instance_prompt\": \"a photo of sks cat\", \"class_prompt\": \"a photo of a cat\"} "
                         "or set instance_prompt/class_prompt in the configuration");
  }
  auto json = read_json_file(path, ExitCode::input_data);
  if (!json.is_object()) throw InputDataError(path.string() + ": must be a JSON object");
  DatasetInfo info;
  for (auto [key, target] : {std::pair{"instance_prompt", &info.instance_prompt},
                             std::pair{"class_prompt", &info.class_prompt}}) {
    if (!json.contains(key) || json[key].is_null()) continue;
    if (!json[key].is_string()) throw InputDataError(path.string() + ": \"" + key + "\" must be a string");
    *target = json[key].get<std::string>();
  }
  return info;
}

std::vector<fs::path> list_images(const fs::path& dir) {
  if (!fs::is_directory(dir)) throw InputDataError(dir.string() + ": folder not found");
  std::vector<fs::path> images;
  std::error_code error;
  for (auto it = fs::directory_iterator(dir, error); !error && it != fs::directory_iterator(); it.increment(error)) {
    if (!io::is_image_file(it->path())) continue;
    std::error_code status;
    const bool regular = it->is_regular_file(status);
    // A symbolic link that loops or leads nowhere is the user's to fix, not something to skip.
    if (status || (!regular && it->is_symlink(status))) {
      throw InputDataError(it->path().string() + ": cannot be read as an image (" +
                           (status ? status.message() : std::string("a symbolic link to nothing")) +
                           "); remove it or point it at a photo");
    }
    if (regular) images.push_back(it->path());
  }
  if (error) throw InputDataError(dir.string() + ": cannot list the folder (" + error.message() + ")");
  std::sort(images.begin(), images.end());
  return images;
}

std::vector<ImageSummary> check_images(const fs::path& dir) {
  auto paths = list_images(dir);
  if (paths.empty()) {
    throw InputDataError(dir.string() + ": no images (png, jpg or jpeg); put the subject's photos there");
  }
  std::vector<ImageSummary> summaries;
  std::vector<std::string> failures;
  for (const auto& path : paths) {
    try {
      io::Image image = io::read_image(path);
      summaries.push_back({path, image.width, image.height});
    } catch (const InputDataError& e) {
      failures.push_back(e.what());
    }
  }
  if (!failures.empty()) {
    std::string message = std::to_string(failures.size()) + " of " + std::to_string(paths.size()) +
                          " images in " + dir.string() + " cannot be read:";
    for (const auto& failure : failures) message += "\n  " + failure;
    throw InputDataError(message);
  }
  return summaries;
}

}  // namespace sdtrain::train
