// The atomics and memory intrinsics of the test suite's host stand-ins (tests/_cuda_emu.py):
// blocks run one at a time, and a SIMT thread switches only at a barrier or a warp
// operation, so an atomic is a plain read-modify-write and a fence does nothing.
#pragma once
static inline int atomicAdd(int* a, int v) { int o = *a; *a = o + v; return o; }
static inline int atomicMin(int* a, int v) { int o = *a; if (v < o) *a = v; return o; }
static inline int atomicMax(int* a, int v) { int o = *a; if (v > o) *a = v; return o; }
static inline unsigned int atomicInc(unsigned int* a, unsigned int v)
{ unsigned int o = *a; *a = o >= v ? 0u : o + 1u; return o; }
static inline void __threadfence() {}
template <class T> static inline T __ldcg(const T* p) { return *p; }
