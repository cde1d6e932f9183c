// Test buffers that end exactly at a PROT_NONE page, for the host emulations of the AMX kernels
// (amx_emulation.cpp, amx_attention_emulation.cpp): a read or write one byte past the end faults.
#pragma once

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

template <typename T>
static T* guarded(int64_t count, uint8_t fill) {
  const size_t n = static_cast<size_t>(count) * sizeof(T), pg = 4096, total = (n + pg - 1) / pg * pg + pg;
  void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED || mprotect(static_cast<char*>(base) + total - pg, pg, PROT_NONE) != 0) std::abort();
  T* p = reinterpret_cast<T*>(static_cast<char*>(base) + total - pg - n);
  std::memset(p, fill, n);
  return p;
}
