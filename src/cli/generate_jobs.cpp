// `sdtrain generate --jobs JOBS.jsonl`: one base loaded once, then each line's request with
// its own adapter applied and removed again — the multi-model endpoint of an avatar service,
// where each customer's adapter is swapped onto a shared, already-loaded base.
#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>

#include "generate_support.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/log.h"

namespace fs = std::filesystem;

namespace sdtrain::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct Job {
  GenerateArguments args;  // the command's settings with this line's fields
  std::vector<LoRAChoice> loras;
};

// A jobs line: {"prompt", "out"} required; "seed", "num_images", "lora", "scale" optional;
// "negative_prompt", "steps", "guidance_scale" override the command's. Relative paths are
// relative to the jobs file's folder. Anything else is an error (a misspelt key would
// otherwise silently fall back to a default).
Job parse_job(const std::string& line, const GenerateArguments& command, const fs::path& base_dir) {
  const auto value = nlohmann::json::parse(line, nullptr, false);
  if (value.is_discarded() || !value.is_object()) throw ConfigError("not a JSON object");
  Job job{command, {}};
  job.args.jobs.clear();
  job.args.loras.clear();
  auto path = [&](const std::string& text) {
    return fs::path(text).is_relative() ? (base_dir / text).string() : text;
  };
  double scale = 1.0;
  std::string lora;
  try {
    for (const auto& [key, field] : value.items()) {
      if (key == "prompt")
        job.args.prompt = field.get<std::string>();
      else if (key == "negative_prompt")
        job.args.negative_prompt = field.get<std::string>();
      else if (key == "out")
        job.args.out = path(field.get<std::string>());
      else if (key == "seed")
        job.args.seed = field.get<int64_t>();
      else if (key == "num_images")
        job.args.num_images = field.get<int64_t>();
      else if (key == "steps")
        job.args.steps = field.get<int64_t>();
      else if (key == "guidance_scale")
        job.args.guidance_scale = field.get<double>();
      else if (key == "scale")
        scale = field.get<double>();
      else if (key == "lora")
        lora = field.is_null() ? "" : path(field.get<std::string>());
      else
        throw ConfigError("unknown key \"" + key + "\"");
    }
  } catch (const nlohmann::json::exception& e) {
    throw ConfigError(std::string("a value has the wrong type (") + e.what() + ")");
  }
  if (job.args.prompt.empty()) throw ConfigError("\"prompt\" is required");
  if (value.find("out") == value.end()) throw ConfigError("\"out\" is required");
  if (job.args.num_images < 1 || job.args.steps < 1)
    throw ConfigError("\"num_images\" and \"steps\" must be at least 1");
  if (!lora.empty()) {
    job.loras.push_back({lora, scale});
    job.args.loras = {lora + ":" + std::to_string(scale)};
  }
  return job;
}

// Takes the previous job's adapter off and puts this job's on; the time goes in the log.
void swap_adapters(pipeline::StableDiffusionPipeline& sd, const Job& job, int64_t line) {
  const auto started = Clock::now();
  remove_loras(sd);
  apply_loras(sd, job.loras);
  log::info(log::str("job line ", line, ": ",
                     job.loras.empty() ? "the plain base" : "adapter " + job.loras[0].file,
                     " ready in ", format_seconds(Clock::now() - started), " (adapter swap)"));
}

}  // namespace

int run_generation_jobs(const GenerateArguments& args, pipeline::StableDiffusionPipeline& sd) {
  std::ifstream in(args.jobs);
  if (!in) throw ConfigError(args.jobs + ": cannot read the jobs file");
  const fs::path base_dir = fs::absolute(args.jobs).parent_path();
  int first_failure = 0;
  int64_t line_number = 0, done = 0, failed = 0;
  std::string line;
  while (std::getline(in, line)) {
    ++line_number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      const Job job = parse_job(line, args, base_dir);
      swap_adapters(sd, job, line_number);
      generate_and_write(job.args, sd);
      ++done;
    } catch (const Error& e) {
      ++failed;
      if (first_failure == 0) first_failure = static_cast<int>(e.code());
      log::error(log::str(args.jobs, ":", line_number, ": job failed: ", e.what()));
    }
  }
  remove_loras(sd);
  log::info(log::str("jobs: ", done, " done, ", failed, " failed"));
  return first_failure;
}

}  // namespace sdtrain::cli
