// ToPaged and read_paged_model (passes.hpp).
#include <filesystem>
#include <memory>
#include <string>

#include <openvino/pass/manager.hpp>
#include <openvino/pass/sdpa_to_paged_attention.hpp>
#include <openvino/runtime/core.hpp>

#include "kvcrush/passes.hpp"

namespace kvcrush {

bool ToPaged::run_on_model(const std::shared_ptr<ov::Model>& model) {
  // The same flags, in the same order, as the Python call
  // paged_attention_transformation(model, per_layer_blocks, score_outputs, score_aggregation,
  // False, False, False, False) that this pass replaces.
  ov::pass::Manager manager;
  manager.register_pass<ov::pass::SDPAToPagedAttention>(
      options_.per_layer_blocks, options_.score_outputs, options_.score_aggregation,
      /*allow_cache_rotation=*/false, /*allow_xattention=*/false, /*allow_adaptive_rkv=*/false,
      /*allow_qq_bias=*/false);
  return manager.run_passes(model);
}

void to_paged(const std::shared_ptr<ov::Model>& model, const PagedOptions& options) {
  ov::pass::Manager manager;
  manager.register_pass<ToPaged>(options);
  manager.run_passes(model);
}

std::shared_ptr<ov::Model> read_paged_model(ov::Core& core, const std::string& path,
                                            const PagedOptions& options, bool logits_indices) {
  std::filesystem::path xml(path);
  if (std::filesystem::is_directory(xml)) xml /= "openvino_model.xml";
  auto model = core.read_model(xml.string());
  to_paged(model, options);
  if (logits_indices) add_logits_indices(model);
  return model;
}

}  // namespace kvcrush
