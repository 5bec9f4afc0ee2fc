#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace moeserve {
namespace {

using Json = nlohmann::json;

// A header longer than this is refused before it is parsed (real ones are a few MB at most).
constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;

}  // namespace

size_t SafetensorsElementSize(absl::string_view dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "I8" || dtype == "U8" || dtype == "BOOL" || dtype == "F8_E4M3" || dtype == "F8_E5M2")
    return 1;
  return 0;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (file->fd_ < 0) {
    const int err = errno;
    auto message = absl::StrCat("cannot open ", path, ": ", std::strerror(err));
    return err == ENOENT ? absl::NotFoundError(message) : absl::PermissionDeniedError(message);
  }
  struct stat st;
  if (::fstat(file->fd_, &st) != 0) return absl::InternalError(absl::StrCat("cannot stat ", path));
  file->size_ = static_cast<uint64_t>(st.st_size);
  if (file->size_ > 0) {
    file->map_ = ::mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, file->fd_, 0);
    if (file->map_ == MAP_FAILED) {
      file->map_ = nullptr;
      return absl::InternalError(absl::StrCat("cannot mmap ", path, ": ", std::strerror(errno)));
    }
  }
  RETURN_IF_ERROR(file->Parse());
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, size_);
  if (fd_ >= 0) ::close(fd_);
}

const SafetensorsTensor* SafetensorsFile::Find(absl::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::Status SafetensorsFile::Parse() {
  auto error = [this](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": ", parts...));
  };
  if (size_ < 8) return error("file is ", size_, " bytes, too short for the 8-byte header length");
  const auto* bytes = static_cast<const std::byte*>(map_);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | std::to_integer<uint64_t>(bytes[i]);
  if (header_len > size_ - 8) {
    return error("header length ", header_len, " exceeds the file size ", size_,
                 " (truncated file?)");
  }
  if (header_len > kMaxHeaderBytes)
    return error("header length ", header_len, " is implausibly large");
  const char* header = reinterpret_cast<const char*>(bytes + 8);
  Json j = Json::parse(header, header + header_len, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return error("header is not valid JSON");
  if (!j.is_object()) return error("header is not a JSON object");

  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = size_ - data_start;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const Json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) return error("__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) return error("__metadata__[\"", m.key(), "\"] is not a string");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    auto bad = [&](auto&&... parts) { return error("tensor \"", name, "\": ", parts...); };
    if (!v.is_object()) return bad("entry is not an object");
    auto dtype = v.find("dtype");
    auto shape = v.find("shape");
    auto offsets = v.find("data_offsets");
    if (dtype == v.end() || !dtype->is_string()) return bad("missing or non-string \"dtype\"");
    if (shape == v.end() || !shape->is_array()) return bad("missing or non-array \"shape\"");
    if (offsets == v.end() || !offsets->is_array() || offsets->size() != 2) {
      return bad("\"data_offsets\" must be an array [begin, end]");
    }
    SafetensorsTensor t;
    t.name = name;
    t.dtype = dtype->get<std::string>();
    t.element_size = SafetensorsElementSize(t.dtype);
    if (t.element_size == 0) return bad("unknown dtype \"", t.dtype, "\"");
    uint64_t numel = 1;
    for (const Json& d : *shape) {
      if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0)) {
        return bad("shape ", shape->dump(), " has a non-integer or negative dimension");
      }
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > (uint64_t{1} << 62) / dim)
        return bad("shape ", shape->dump(), " overflows");
      numel *= dim;
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    for (const Json& o : *offsets) {
      if (!o.is_number_unsigned() && !(o.is_number_integer() && o.get<int64_t>() >= 0)) {
        return bad("data_offsets ", offsets->dump(), " are not non-negative integers");
      }
    }
    const uint64_t begin = (*offsets)[0].get<uint64_t>(), end = (*offsets)[1].get<uint64_t>();
    if (begin > end) return bad("data_offsets [", begin, ", ", end, "] end before they begin");
    if (end > data_size) {
      return bad("data_offsets [", begin, ", ", end, "] run past the data section (", data_size,
                 " bytes; truncated file?)");
    }
    if (numel > (uint64_t{1} << 62) / t.element_size || end - begin != numel * t.element_size) {
      return bad("data_offsets span ", end - begin, " bytes but ", t.dtype, " shape ",
                 shape->dump(), " needs ", numel * t.element_size);
    }
    t.numel = static_cast<int64_t>(numel);
    t.file_offset = data_start + begin;
    t.data = bytes + t.file_offset;
    tensors_.push_back(std::move(t));
  }
  std::sort(tensors_.begin(), tensors_.end(),
            [](const SafetensorsTensor& a, const SafetensorsTensor& b) {
              return a.file_offset < b.file_offset;
            });
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const SafetensorsTensor& t = tensors_[i];
    if (i > 0) {
      const SafetensorsTensor& prev = tensors_[i - 1];
      const uint64_t prev_end =
          prev.file_offset + static_cast<uint64_t>(prev.numel) * prev.element_size;
      if (t.file_offset < prev_end) {
        return error("tensors \"", prev.name, "\" and \"", t.name,
                     "\" overlap in the data section");
      }
    }
    index_.emplace(t.name, i);
  }
  return absl::OkStatus();
}

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<SafetensorsWriteEntry>& entries,
                              const std::map<std::string, std::string>& metadata) {
  Json header = Json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::vector<uint64_t> sizes;
  for (const SafetensorsWriteEntry& e : entries) {
    const size_t element = SafetensorsElementSize(e.dtype);
    if (element == 0) return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", e.dtype));
    uint64_t numel = 1;
    for (int64_t d : e.shape) numel *= static_cast<uint64_t>(d);
    const uint64_t bytes = numel * element;
    header[e.name] = {
        {"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {offset, offset + bytes}}};
    sizes.push_back(bytes);
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>((text.size() >> (8 * i)) & 0xff);
  out.write(reinterpret_cast<const char*>(len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (size_t i = 0; i < entries.size(); ++i) {
    out.write(static_cast<const char*>(entries[i].data), static_cast<std::streamsize>(sizes[i]));
  }
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat("writing ", path, " failed (disk full?)"));
  return absl::OkStatus();
}

}  // namespace moeserve
