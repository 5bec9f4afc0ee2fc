// Reading and writing the safetensors format (Hugging Face): an 8-byte little-endian header
// length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {}},
// then the data section, offsets relative to its start.
//
// Files are memory-mapped read-only; every header field is checked before any data is touched:
// a truncated file, a header longer than the file, a non-JSON header, unknown dtypes, offsets out
// of range, overlapping tensors or a byte size that does not match the shape are errors that name
// the file and the tensor. Nothing here aborts or reads out of bounds on a malformed file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moeserve {

struct SafetensorsTensor {
  std::string name;
  std::string dtype;        // "BF16", "F32", "I64", ... as in the header
  size_t element_size = 0;  // bytes per element
  std::vector<int64_t> shape;
  int64_t numel = 0;
  const std::byte* data = nullptr;  // into the mapping; numel * element_size bytes
  uint64_t file_offset = 0;         // absolute offset of the data in the file
};

class SafetensorsFile {
 public:
  // Maps and validates `path`.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t file_size() const { return size_; }
  // In file order (ascending data offset).
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  // nullptr when absent.
  const SafetensorsTensor* Find(absl::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  absl::Status Parse();

  std::string path_;
  int fd_ = -1;
  void* map_ = nullptr;
  uint64_t size_ = 0;
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
};

// Bytes per element of a safetensors dtype name; 0 for an unknown name.
size_t SafetensorsElementSize(absl::string_view dtype);

// One tensor to write: `data` holds numel(shape) * element_size(dtype) bytes.
struct SafetensorsWriteEntry {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};
// Writes a safetensors file (header padded with spaces to 8-byte alignment, tensors in the given
// order, each 8-byte aligned in the data section only as far as the entries make it so).
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<SafetensorsWriteEntry>& entries,
                              const std::map<std::string, std::string>& metadata = {
                                  {"format", "pt"}});

}  // namespace moeserve
