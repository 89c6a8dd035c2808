// Input tensors kept between steps and written in place (Python: model_runner.InputBuffers): a
// step whose input has the shape of the last one copies its values into the tensor the request
// already holds (no allocation, no set_tensor call).
#pragma once

#include <cstring>
#include <string>
#include <unordered_map>

#include <openvino/runtime/infer_request.hpp>
#include <openvino/runtime/tensor.hpp>

namespace kvcrush {

class InputTensors {
 public:
  /// Sets input ``name`` of ``req`` (the request this object serves) to ``data``.
  template <class T>
  void put(ov::InferRequest& req, const std::string& name, ov::element::Type type,
           const ov::Shape& shape, const T* data) {
    ov::Tensor& t = tensors_[name];
    if (!t || t.get_shape() != shape) {
      t = ov::Tensor(type, shape);
      req.set_tensor(name, t);
    }
    if (t.get_byte_size()) std::memcpy(t.data(), data, t.get_byte_size());
  }

 private:
  std::unordered_map<std::string, ov::Tensor> tensors_;
};

}  // namespace kvcrush
