"""Run the CUDA backend's driver without a GPU: the kernels of kernels/ compiled for the host.

Each ``.cu`` file is compiled by the host C++ compiler with a small prelude that makes a
``__global__`` function an ordinary ``extern "C"`` function run by one "thread"
(``blockDim = 1``) of the block ``blockIdx.x`` the backend sets before each call, and gives
the atomics their sequential meaning. :class:`HostBackend` then offers what
``synthgen._cuda`` needs of a backend (``xp``, ``launch_flat``, ``pointer``, ``block_rule``,
``upload``, ``download``, ``on_device``, ``context``) with NumPy as ``xp``, so the very
driver that runs on a GPU runs in CI on the same CUDA C sources. By default each segment of
a launch gets one block, which walks all its elements in order; ``block_rule`` can ask for
the many blocks per segment a GPU runs.

With ``threads`` > 1 (a multiple of 32) the backend is the *SIMT stand-in*: the kernels' GPU
branches (``__CUDACC__``: the warp vote of the segment search, the warp shuffles and shared
memory of the block reductions, the barriers of the row sums) compiled for the host under
``SIMT_PRELUDE``, each thread of a block a fiber that runs until it reaches a barrier or a
warp operation. The scheduler runs the warps of a block one after another, each as far as it
can go, in an order drawn anew at each barrier, so one warp overtakes another as far as the
barriers allow: a barrier missing between a write of shared memory and another warp's (or
lane's) read of it gives a wrong result, and a warp whose lanes split between a warp
operation and a barrier, or threads waiting at a barrier others have left, stop the launch
with an error naming the block and warp. Shared memory starts each block as 0xff bytes (with
a thread-order seed, a byte drawn per block), as a GPU's holds whatever was there. A launch
that runs past its CPU time (``watchdog_s``) or faults (an address out of bounds; a thread's
stack overflowing onto the guard page below it) fails with an error naming the block and
thread, where it would hang or crash the process. What it cannot show: races between blocks
(blocks run one at a time, in a shuffled order), memory ordering (fences are no-ops; a warp
operation orders memory here, where only ``__syncwarp`` does on a GPU), and interleavings
within the stretch a thread runs alone, from one barrier or warp operation to the next: a
plain read-modify-write (``x += 1``) of shared or global memory by many threads comes out as
if atomic, where a GPU loses updates. Without a GPU, this is what runs the code that only a
GPU would otherwise run.

Every launch is checked against the kernel's C signature, parsed from the source: each
pointer argument must be a C-contiguous array (or a :class:`Pointer`) of the pointed-to type
and each scalar a NumPy scalar of the parameter's exact type (CuPy passes a scalar by its
NumPy type, so a mismatch there would silently corrupt a GPU launch).
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np

KERNELS = Path(__file__).resolve().parents[1] / "kernels"

# The atomics and memory intrinsics of both stand-ins: blocks run one at a time, and a SIMT
# thread switches only at a barrier or a warp operation, so an atomic is a plain
# read-modify-write and a fence does nothing.
_ATOMICS = r"""
static inline int atomicAdd(int* a, int v) { int o = *a; *a = o + v; return o; }
static inline int atomicMin(int* a, int v) { int o = *a; if (v < o) *a = v; return o; }
static inline int atomicMax(int* a, int v) { int o = *a; if (v > o) *a = v; return o; }
static inline unsigned int atomicInc(unsigned int* a, unsigned int v)
{ unsigned int o = *a; *a = o >= v ? 0u : o + 1u; return o; }
static inline void __threadfence() {}
template <class T> static inline T __ldcg(const T* p) { return *p; }
"""

PRELUDE = r"""
#pragma once
#include <math.h>
#define __global__
#define __launch_bounds__(...)
#define __shared__
static inline void __syncthreads() {}
struct sg_dim3 { unsigned int x, y, z; };
static sg_dim3 blockIdx = {0, 0, 0};
extern "C" void sg_emu_set_block(unsigned int x) { blockIdx.x = x; }
static const sg_dim3 threadIdx = {0, 0, 0};
static const sg_dim3 blockDim = {1, 1, 1};
"""
PRELUDE += _ATOMICS

SIMT_PRELUDE = r"""
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <ucontext.h>
#include <functional>
// The kernels' GPU branches (warp votes, shuffles, block reductions in shared memory)
#define __CUDACC__ 1
#define __device__
#define __forceinline__ inline
#define __global__
#define __launch_bounds__(...)
// Shared memory: one copy for all the block's threads (blocks run one at a time). Volatile,
// so that the compiler reloads it after a barrier (a barrier is a function call it might
// otherwise see through for a variable whose address never escapes).
#define __shared__ static volatile
struct sg_dim3 { unsigned int x, y, z; };
namespace sg_emu {
enum { RUN, SYNC, WARP, DONE };
enum { OP_SHFL_DOWN = 1, OP_BALLOT = 2 };
struct Fiber {
    ucontext_t ctx;  // (its first start)
    jmp_buf jb;      // where it parked
    int state, op, started;
    unsigned mask, delta;  // the warp operation it waits at, and its value
    uint64_t val, res;
};
static jmp_buf main_jb;
static Fiber* fib = 0;
static char* stacks = 0;  // each fiber's: a guard page, then STACK bytes
static size_t page = 0;
static char alt_stack[1 << 16];  // the signal handler's (a fiber's stack may be full)
static stack_t old_ss;
static unsigned cap = 0;
static volatile unsigned cur = 0;
static std::function<void()>* body = 0;
static char err[512];
static const size_t STACK = 1 << 17;
static volatile sig_atomic_t in_fiber = 0;  // a fiber runs (not the scheduler)
static double watchdog_s = 120;  // CPU seconds a launch may take
static pthread_t owner;  // the thread running the launch
static timer_t wd_timer;  // the watchdog: the owner's CPU time
static bool wd_armed = false;
static struct sigaction old_act[4];
static const int SIGS[4] = {SIGVTALRM, SIGSEGV, SIGBUS, SIGFPE};
static uint64_t shared[256];  // (address, bytes) of each __shared__ variable
static unsigned n_shared = 0;
}
static sg_dim3 blockIdx = {0, 0, 0};
static sg_dim3 blockDim = {1, 1, 1};
__attribute__((noinline)) static sg_dim3 sg_emu_thread()
{
    sg_dim3 d = {sg_emu::cur, 0, 0};
    return d;
}
#define threadIdx (sg_emu_thread())
namespace sg_emu {
// The running thread stops at a barrier or a warp-synchronous operation (state) and hands
// control back to the block's scheduler, which resumes it once every thread concerned is
// there. (A switch is a _setjmp/_longjmp pair: no system call, as swapcontext makes; a
// thread's first start only goes through setcontext.)
__attribute__((noinline)) static void park(int state)
{
    Fiber& f = fib[cur];
    f.state = state;
    if (!_setjmp(f.jb)) {
        in_fiber = 0;
        _longjmp(main_jb, 1);
    }
}
// A thread's life: the launch's kernel for one block after another (resumed at each new block).
static void entry()
{
    for (;;) {
        (*body)();
        park(DONE);
    }
}
// Runs thread t until it parks (1), or until a signal stops it (the signal: a fault in the
// kernel, or the watchdog's SIGVTALRM).
__attribute__((noinline)) static int resume(unsigned t)
{
    cur = t;
    const int r = _setjmp(main_jb);
    if (r == 0) {
        in_fiber = 1;
        if (fib[t].started) _longjmp(fib[t].jb, 1);
        fib[t].started = 1;
        setcontext(&fib[t].ctx);
    }
    return r;
}
// A fault in a kernel, or a launch past its CPU time (a loop that does not end, as a kernel
// missing a barrier may run): the running thread stops and the launch fails with an error,
// where the process would crash or hang. Elsewhere, the handler that was there before.
static void on_signal(int sig, siginfo_t*, void*)
{
    if (pthread_equal(pthread_self(), owner) && in_fiber) {
        in_fiber = 0;
        _longjmp(main_jb, sig);
    }
    // a fault elsewhere (another thread, the scheduler): the handler there before, on the
    // fault's next try; a late watchdog tick: nothing
    for (int i = 1; i < 4; ++i) if (SIGS[i] == sig) sigaction(sig, &old_act[i], 0);
}
// Signal handlers and the watchdog on (for a launch) or off (after it). The watchdog is a
// timer on the CPU time of the launching thread alone, signalling that thread: first after
// watchdog_s, then every 0.1 s until a tick finds a kernel thread running (one in the
// scheduler is let be). Without the timer (a system that refuses it), no watchdog.
static void guard(bool on)
{
    if (on) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_signal;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
        stack_t ss;
        memset(&ss, 0, sizeof ss);
        ss.ss_sp = alt_stack;
        ss.ss_size = sizeof alt_stack;
        sigaltstack(&ss, &old_ss);
        sigemptyset(&sa.sa_mask);
        owner = pthread_self();
        for (int i = 0; i < 4; ++i) sigaction(SIGS[i], &sa, &old_act[i]);
        const double w = watchdog_s > 1e-3 ? (watchdog_s < 1e6 ? watchdog_s : 1e6) : 1e-3;
        struct itimerspec ts;
        memset(&ts, 0, sizeof ts);
        ts.it_value.tv_sec = (time_t)w;
        ts.it_value.tv_nsec = (long)((w - (double)ts.it_value.tv_sec) * 1e9);
        if (ts.it_value.tv_nsec >= 1000000000L) {
            ts.it_value.tv_sec += 1;
            ts.it_value.tv_nsec -= 1000000000L;
        }
        ts.it_interval.tv_nsec = 100000000L;
        struct sigevent ev;
        memset(&ev, 0, sizeof ev);
        ev.sigev_notify = SIGEV_THREAD_ID;
        ev.sigev_signo = SIGVTALRM;
#ifdef sigev_notify_thread_id
        ev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
#else
        ev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
#endif
        wd_armed = timer_create(CLOCK_THREAD_CPUTIME_ID, &ev, &wd_timer) == 0;
        if (wd_armed) timer_settime(wd_timer, 0, &ts, 0);
    } else {
        if (wd_armed) timer_delete(wd_timer);  // (a tick still pending meets on_signal)
        wd_armed = false;
        for (int i = 0; i < 4; ++i) sigaction(SIGS[i], &old_act[i], 0);
        sigaltstack(&old_ss, 0);
    }
}
// Threads 0..n, to be started afresh.
static void fresh(unsigned n)
{
    for (unsigned t = 0; t < n; ++t) {
        getcontext(&fib[t].ctx);
        fib[t].ctx.uc_stack.ss_sp = stacks + t * (STACK + page) + page;
        fib[t].ctx.uc_stack.ss_size = STACK;
        fib[t].ctx.uc_link = 0;
        makecontext(&fib[t].ctx, entry, 0);
        fib[t].started = 0;
    }
}
static uint64_t mix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
// Completes the warp-synchronous operation the 32 lanes of warp w wait at. 0, or -1 (err set)
// where they do not all wait at the same one with a full mask (a divergent warp).
static int warp_op(unsigned blk, unsigned w, uint64_t seed)
{
    Fiber* l = fib + 32 * w;
    int r = 0;  // a lane that waits at the operation
    while (l[r].state != WARP) ++r;
    for (int i = 0; i < 32; ++i) {
        if (l[i].state != WARP || l[i].op != l[r].op || l[i].mask != 0xffffffffu) {
            snprintf(err, sizeof err, "block %u, warp %u: lane %d waits at a full-mask warp "
                     "operation, lane %d %s (thread order seed %llu)", blk, w, r, i,
                     l[i].state == DONE ? "has returned" : l[i].state == SYNC
                     ? "waits at __syncthreads" : "waits at another warp operation",
                     (unsigned long long)seed);
            return -1;
        }
    }
    uint64_t ballot = 0;
    for (int i = 0; i < 32; ++i) ballot |= (uint64_t)(l[i].val != 0) << i;
    for (int i = 0; i < 32; ++i) {
        if (l[r].op == OP_BALLOT) l[i].res = ballot;
        else l[i].res = i + l[i].delta < 32 ? l[i + l[i].delta].val : l[i].val;
        l[i].state = RUN;
    }
    return 0;
}
// A permutation of 0..n drawn from h (h == 0: ascending).
static void shuffle(unsigned* p, unsigned n, uint64_t h)
{
    for (unsigned t = 0; t < n; ++t) p[t] = t;
    for (unsigned t = n - 1; h && t > 0; --t) {
        h = mix64(h);
        const unsigned j = (unsigned)(h % (t + 1)), s = p[t];
        p[t] = p[j];
        p[j] = s;
    }
}
// Runs blocks order[0..nb) (or 0..nb) of `threads` threads each, one block at a time, each
// thread a fiber that runs until it reaches a barrier or a warp operation (it "parks").
// Between two barriers the warps run one after another, in an order drawn anew at each
// barrier from tseed (0: ascending), each as far as it goes: its lanes (in a drawn order) to
// their next warp operation, which the scheduler completes once all 32 wait at it, and so
// on to the barrier or the end. So one warp runs ahead of another as far as the barriers let
// it, either way round: a read of what another warp writes, or another lane, without a
// barrier between them, sees the wrong value in some order. When every warp waits at the
// barrier they all pass it. Errors (err set, -1): a warp whose lanes do not all reach the
// same warp operation; threads waiting at a barrier that others have left by returning.
static int run(unsigned nb, const unsigned* order, unsigned threads, uint64_t tseed,
               std::function<void()>& fn)
{
    if (threads == 0 || threads % 32 || threads > 1024) {
        snprintf(err, sizeof err, "blockDim %u is not a multiple of 32 up to 1024", threads);
        return -1;
    }
    if (threads > cap) {
        free(fib);
        if (stacks) munmap(stacks, cap * (STACK + page));
        page = (size_t)sysconf(_SC_PAGESIZE);
        fib = (Fiber*)calloc(threads, sizeof(Fiber));
        // a thread whose stack overflows faults on the guard page below it (the kernels are
        // compiled with stack probes), instead of writing over its neighbour's stack
        void* m = mmap(0, threads * (STACK + page), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            snprintf(err, sizeof err, "no memory for %u thread stacks", threads);
            stacks = 0;
            cap = 0;
            return -1;
        }
        stacks = (char*)m;
        for (unsigned t = 0; t < threads; ++t)
            mprotect(stacks + t * (STACK + page), page, PROT_NONE);
        cap = threads;
        fresh(cap);
    }
    const unsigned nw = threads / 32;
    guard(true);
    unsigned wperm[32], lperm[32];
    blockDim.x = threads;
    body = &fn;
    int rc = 0;
    uint64_t draw = 0;  // draws so far (each permutation its own)
    for (unsigned i = 0; i < nb && rc == 0; ++i) {
        blockIdx.x = order ? order[i] : i;
        const uint64_t key = tseed ? mix64(tseed ^ ((uint64_t)blockIdx.x << 20)) : 0;
        for (unsigned t = 0; t < threads; ++t) fib[t].state = RUN;
        // shared memory starts undefined, as on a GPU (not as the last block left it)
        // (0xff bytes, NaN and -1, or with a seed a byte drawn per block: -1 is the identity
        // of a MAX reduction, and a NaN drops out of a MIN or MAX)
        const int poison = key ? (int)(mix64(key) & 0xff) : 0xff;
        for (unsigned k = 0; k < n_shared; k += 2) memset((void*)shared[k], poison, shared[k + 1]);
        for (;;) {  // from one barrier to the next
            shuffle(wperm, nw, key ? mix64(key + ++draw) : 0);
            for (unsigned k = 0; k < nw && rc == 0; ++k) {
                Fiber* l = fib + 32 * wperm[k];
                for (;;) {  // the warp, to its next warp operation
                    shuffle(lperm, 32, key ? mix64(key + ++draw) : 0);
                    for (unsigned j = 0; j < 32 && rc == 0; ++j) {
                        if (l[lperm[j]].state != RUN) continue;
                        const int sig = resume(32 * wperm[k] + lperm[j]);
                        if (sig == 1) continue;
                        snprintf(err, sizeof err, "block %u, thread %u: %s (thread order seed "
                                 "%llu)", blockIdx.x, cur, sig == SIGVTALRM
                                 ? "still running past the launch's CPU time (a loop that "
                                   "does not end?)" : sig == SIGFPE ? "arithmetic exception"
                                 : "memory fault (an address out of bounds, or a stack "
                                   "overflow?)",
                                 (unsigned long long)tseed);
                        rc = -1;
                    }
                    if (rc) break;
                    bool op = false;
                    for (unsigned j = 0; j < 32; ++j) op |= l[j].state == WARP;
                    if (!op) break;
                    if ((rc = warp_op(blockIdx.x, wperm[k], tseed)) != 0) break;
                }
            }
            if (rc) break;
            unsigned n_sync = 0, n_done = 0;
            for (unsigned t = 0; t < threads; ++t) {
                n_sync += fib[t].state == SYNC;
                n_done += fib[t].state == DONE;
            }
            if (n_done == threads) break;
            if (n_done) {
                snprintf(err, sizeof err, "block %u: %u threads wait at __syncthreads, %u have "
                         "returned (thread order seed %llu)", blockIdx.x, n_sync, n_done,
                         (unsigned long long)tseed);
                rc = -1;
                break;
            }
            for (unsigned t = 0; t < threads; ++t) fib[t].state = RUN;  // all at the barrier
        }
    }
    guard(false);
    if (rc) fresh(cap);  // (threads stopped inside a block start afresh next time)
    return rc;
}
}
extern "C" const char* sg_emu_error() { return sg_emu::err; }
extern "C" void sg_emu_watchdog(double s) { sg_emu::watchdog_s = s; }
extern "C" void sg_emu_shared(const uint64_t* r, unsigned n)
{
    sg_emu::n_shared = n < 256 ? n : 256;
    memcpy(sg_emu::shared, r, sg_emu::n_shared * sizeof *r);
}
static inline void __syncthreads() { sg_emu::park(sg_emu::SYNC); }
template <class V> static inline V __shfl_down_sync(unsigned mask, V v, unsigned delta)
{
    static_assert(sizeof(V) <= 8, "a shuffled value is at most 8 bytes");
    sg_emu::Fiber& f = sg_emu::fib[sg_emu::cur];
    f.op = sg_emu::OP_SHFL_DOWN;
    f.mask = mask;
    f.delta = delta;
    f.val = 0;
    memcpy(&f.val, &v, sizeof v);
    sg_emu::park(sg_emu::WARP);
    V r;
    memcpy(&r, &f.res, sizeof r);
    return r;
}
static inline unsigned int __ballot_sync(unsigned mask, int pred)
{
    sg_emu::Fiber& f = sg_emu::fib[sg_emu::cur];
    f.op = sg_emu::OP_BALLOT;
    f.mask = mask;
    f.val = pred != 0;
    sg_emu::park(sg_emu::WARP);
    return (unsigned int)f.res;
}
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
"""
SIMT_PRELUDE += _ATOMICS

_SIMT_LOCK = threading.Lock()

_SIG = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(([^)]*)\)',
    re.S,
)

_POINTEE = {
    "float": np.float32,
    "double": np.float64,
    "unsigned char": np.uint8,
    "long long": np.int64,
    "int": np.int32,
    "unsigned int": np.uint32,
}
_SCALAR = {
    "float": (np.float32, ctypes.c_float),
    "double": (np.float64, ctypes.c_double),
    "int": (np.int32, ctypes.c_int),
    "unsigned int": (np.uint32, ctypes.c_uint),
    "long long": (np.int64, ctypes.c_longlong),
}


def _param_type(decl: str) -> tuple[str, bool]:
    """``("float", True)`` for ``const float* __restrict__ x``."""
    d = decl.replace("__restrict__", " ").replace("const", " ")
    ptr = "*" in d
    words = d.replace("*", " ").split()[:-1]  # drop the parameter's name
    return " ".join(words), ptr


def signatures(source: str) -> dict[str, list[tuple[str, bool]]]:
    return {
        name: [_param_type(p) for p in params.split(",")] for name, params in _SIG.findall(source)
    }


def _trampolines(source: str) -> str:
    """For the SIMT stand-in: a C entry ``sg_simt_<kernel>`` per kernel, which takes the
    launch's arguments as 8-byte words and runs the kernel's blocks through the fiber
    scheduler (``sg_emu::run``)."""
    out = ["#include <functional>"]
    for name, params in _SIG.findall(source):
        lines, names = [], []
        for k, decl in enumerate(p.strip() for p in params.split(",") if p.strip()):
            typ = re.match(r"(.*?)\w+\s*$", decl, re.S).group(1).strip()
            if "*" in typ:
                lines.append(f"    {typ} a{k} = ({typ})(uintptr_t)a[{k}];")
            else:
                typ = typ.replace("const", "").strip()
                lines.append(f"    {typ} a{k}; memcpy(&a{k}, &a[{k}], sizeof a{k});")
            names.append(f"a{k}")
        out += [
            f'extern "C" int sg_simt_{name}(unsigned nb, const unsigned* order, unsigned threads,',
            "                              unsigned long long tseed, const uint64_t* a)",
            "{",
            *lines,
            f"    std::function<void()> f = [&]() {{ {name}({', '.join(names)}); }};",
            "    return sg_emu::run(nb, order, threads, tseed, f);",
            "}",
        ]
    return "\n".join(out) + "\n"


def _poison_shared(dll, lib: Path) -> None:
    """Tells the SIMT stand-in where the kernels' ``__shared__`` variables are (every
    function-local static of the library, ``_ZZ...`` in its symbol table), which it fills
    with 0xff bytes (NaN, -1) at the start of each block, as a GPU's shared memory holds
    whatever was there: a read of a value the block has not written shows."""
    nm = shutil.which("nm")
    if nm is None:
        raise RuntimeError("no nm (binutils) for the SIMT stand-in")
    out = subprocess.run([nm, "-S", "--defined-only", str(lib)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    syms = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) == 4:
            syms[f[3]] = (int(f[0], 16), int(f[1], 16), f[2])
    if "sg_emu_error" not in syms:
        raise RuntimeError(f"{lib.name}: no symbol table for the SIMT stand-in")
    base = ctypes.cast(dll.sg_emu_error, ctypes.c_void_p).value - syms["sg_emu_error"][0]
    # writable data only (a static const table, or assert's __func__, is read-only: r, R)
    ranges = [v for name, (a, n, kind) in sorted(syms.items())
              if name.startswith("_ZZ") and kind in "bBdDvV" for v in (base + a, n)]  # fmt: skip
    if not ranges or len(ranges) > 256:
        raise RuntimeError(f"{lib.name}: {len(ranges) // 2} __shared__ variables found")
    r = np.array(ranges, dtype=np.uint64)
    dll.sg_emu_shared(ctypes.c_void_p(r.ctypes.data), ctypes.c_uint(len(r)))


class DeviceArray(np.ndarray):
    """A NumPy array the stand-in treats as GPU-resident (a CuPy array's role)."""


def to_device(a: np.ndarray) -> DeviceArray:
    return np.array(a, copy=True).view(DeviceArray)


class Pointer:
    """A device address passed as a pointer argument, with the type it points to (checked
    against the kernel's signature, as an array argument's dtype is)."""

    __slots__ = ("address", "dtype")

    def __init__(self, address: int, dtype: np.dtype) -> None:
        self.address, self.dtype = address, dtype


class HostBackend:
    """The stand-in for ``synthgen._cuda.CupyBackend`` (see the module docstring)."""

    xp = np

    def __init__(self, build_dir: Path, block_rule: tuple[int, int] = (1 << 62, 1),
                 most_blocks: int = 0, threads: int = 1,
                 kernels: Path = KERNELS) -> None:  # fmt: skip
        # the flat schedules' rule (elements per block, most blocks per segment): by default
        # one block per segment, which walks all its elements, in order (so sums come out as
        # on the CPU); a finer rule runs the kernels' block-stride walks as a GPU would
        self.block_rule = block_rule
        # the blocks a launch keeps at most (CupyBackend.most_blocks; 0: no limit)
        self.most_blocks = most_blocks
        # the order a launch runs its blocks in: None, ascending; an int, a permutation drawn
        # per launch from that seed (a GPU runs blocks in any order; what they add up must
        # not depend on it)
        self.block_order: int | None = None
        # threads a block (blockDim.x): 1, the kernels' host branches; a multiple of 32, the
        # SIMT stand-in (see SIMT_PRELUDE): the GPU branches, every thread a fiber
        self.threads = int(threads)
        # with threads > 1, the order runnable threads run in between two barriers: None,
        # ascending; an int, a permutation drawn per round from that seed
        self.thread_order: int | None = None
        # with threads > 1, the CPU seconds a launch may take before it fails (a kernel
        # looping forever fails its test instead of hanging the suite)
        self.watchdog_s = 120.0
        cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        if cxx is None:
            raise RuntimeError("no host C++ compiler")
        simt = self.threads > 1
        prelude = build_dir / "sg_host_prelude.h"
        prelude.write_text(SIMT_PRELUDE if simt else PRELUDE)
        self.sigs: dict[str, list[tuple[str, bool]]] = {}
        self.fns: dict[str, ctypes._CFuncPtr] = {}
        self.launches: list[str] = []
        self._set_block: dict[str, ctypes._CFuncPtr] = {}
        self._error: dict[str, ctypes._CFuncPtr] = {}
        self._watchdog: dict[str, ctypes._CFuncPtr] = {}
        self._file: dict[str, str] = {}
        for src in sorted(Path(kernels).glob("*.cu")):
            lib = build_dir / f"lib{src.stem}.so"
            unit = src
            if simt:
                unit = build_dir / f"{src.stem}_simt.cpp"
                unit.write_text(f'#include "{src.resolve()}"\n' + _trampolines(src.read_text()))
            # (a fortified longjmp refuses to jump to another stack: the SIMT threads')
            # (-fno-gnu-unique: a template's static, a __shared__ variable of sg_block_reduce,
            # is otherwise one copy for every library loaded, bound to the first's)
            fortify = ["-U_FORTIFY_SOURCE", "-pthread", "-fstack-clash-protection",
                       *self._no_gnu_unique(cxx)] if simt else []  # fmt: skip
            subprocess.run(
                [cxx, "-O2", "-std=c++14", "-shared", "-fPIC", "-ffp-contract=off", *fortify,
                 "-include", str(prelude), f"-I{kernels}", "-x", "c++", str(unit), "-o", str(lib),
                 *(["-lrt"] if simt else [])],  # (timer_create: librt before glibc 2.34)
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            dll = ctypes.CDLL(str(lib))
            if simt:
                self._error[src.stem] = dll.sg_emu_error
                dll.sg_emu_error.restype = ctypes.c_char_p
                dll.sg_emu_watchdog.argtypes = [ctypes.c_double]
                self._watchdog[src.stem] = dll.sg_emu_watchdog
                _poison_shared(dll, lib)
            else:
                self._set_block[src.stem] = dll.sg_emu_set_block
            for name, params in signatures(src.read_text()).items():
                self.sigs[name] = params
                self._file[name] = src.stem
                if simt:
                    fn = getattr(dll, f"sg_simt_{name}")
                    fn.restype = ctypes.c_int
                    fn.argtypes = [ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint,
                                   ctypes.c_ulonglong, ctypes.c_void_p]  # fmt: skip
                else:
                    fn = getattr(dll, name)
                    fn.restype = None
                    fn.argtypes = [ctypes.c_void_p if ptr else _SCALAR[t][1] for t, ptr in params]
                self.fns[name] = fn

    @staticmethod
    def _no_gnu_unique(cxx: str) -> list[str]:
        v = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
        return [] if "clang" in v.lower() else ["-fno-gnu-unique"]

    def _convert(self, name: str, args) -> list:
        """The C values of a launch's arguments, each checked against the kernel's signature."""
        params = self.sigs[name]
        if len(args) != len(params):
            raise TypeError(f"{name}: {len(args)} arguments for {len(params)} parameters")
        conv = []
        for k, (a, (t, ptr)) in enumerate(zip(args, params, strict=True)):
            if ptr:
                if isinstance(a, Pointer):
                    if a.dtype != _POINTEE[t]:
                        raise TypeError(
                            f"{name} argument {k}: expected a {t}* address, got one of {a.dtype}"
                        )
                    conv.append(a.address)
                    continue
                if not isinstance(a, np.ndarray) or a.dtype != _POINTEE[t]:
                    raise TypeError(
                        f"{name} argument {k}: expected {t}* array, got "
                        f"{getattr(a, 'dtype', type(a).__name__)}"
                    )
                if not a.flags.c_contiguous:
                    raise TypeError(f"{name} argument {k}: array is not C-contiguous")
                conv.append(a.ctypes.data)
            else:
                want = _SCALAR[t][0]
                if type(a) is not want:
                    raise TypeError(
                        f"{name} argument {k}: expected a NumPy {np.dtype(want)} scalar for "
                        f"C {t}, got {type(a).__name__}"
                    )
                conv.append(a.item())
        return conv

    def launch_flat(self, name: str, n_blocks: int, *args) -> None:
        """A segmented launch of ``n_blocks`` blocks (the kernel's schedule, its first
        argument, maps each to its segment): the blocks one after another, each one thread
        (or ``threads`` fibers)."""
        conv = self._convert(name, args)
        self.launches.append(name)
        order = range(int(n_blocks))
        if self.block_order is not None:
            rng = np.random.default_rng((self.block_order, len(self.launches)))
            order = rng.permutation(int(n_blocks)).tolist()
        if self.threads > 1:
            self._launch_simt(name, order, conv)
            return
        fn, set_block = self.fns[name], self._set_block[self._file[name]]
        for b in order:
            set_block(b)
            fn(*conv)
        set_block(0)

    def _launch_simt(self, name: str, order, conv: list) -> None:
        words = np.zeros(max(len(conv), 1), dtype=np.uint64)
        for k, (v, (t, ptr)) in enumerate(zip(conv, self.sigs[name], strict=True)):
            if ptr:
                words[k] = v
            else:  # the value's bytes first (the trampoline copies sizeof(type) bytes back)
                b = np.array(v, dtype=_SCALAR[t][0]).tobytes()
                words[k] = np.frombuffer(b.ljust(8, b"\0"), dtype=np.uint64)[0]
        order = np.asarray(list(order), dtype=np.uint32)
        tseed = 0
        if self.thread_order is not None:  # (never 0: 0 is ascending)
            tseed = (int(self.thread_order) * 1_000_003 + len(self.launches)) % (1 << 63) | 1
        if not 1e-3 <= self.watchdog_s <= 1e6:
            raise ValueError(f"watchdog_s {self.watchdog_s!r}: from 0.001 to 1e6 seconds")
        # one SIMT launch at a time in the process: a library's fibers, and the process's
        # signal handlers, which each launch takes over and puts back
        with _SIMT_LOCK:
            self._watchdog[self._file[name]](self.watchdog_s)
            rc = self.fns[name](len(order), order.ctypes.data, self.threads, tseed,
                                words.ctypes.data)  # fmt: skip
        if rc:
            msg = self._error[self._file[name]]().decode()
            raise RuntimeError(f"{name} on the SIMT stand-in: {msg}")

    def pointer(self, address: int, dtype) -> Pointer:
        """A device address as a kernel argument (``dtype``: what it points to)."""
        return Pointer(int(address), np.dtype(dtype))

    def ptr(self, a) -> int:
        # (``a.ctypes.data`` builds a ctypes object: ~10x slower, and the host-time
        # benchmark replays the driver through this backend)
        return int(a.__array_interface__["data"][0])

    def alloc(self, nbytes: int) -> DeviceArray:
        """Uninitialised, as device memory is."""
        return np.empty(max(int(nbytes), 16), dtype=np.uint8).view(DeviceArray)

    def fill(self, dev, value) -> None:
        dev.fill(value)

    def copy_in(self, dev, host: np.ndarray) -> None:
        dev[...] = host

    def upload(self, host: np.ndarray) -> DeviceArray:
        return to_device(host)

    def download(self, dev) -> np.ndarray:
        return np.array(dev, copy=True).view(np.ndarray)

    def on_device(self, a) -> bool:
        return isinstance(a, DeviceArray)

    def context(self, stream, arrays):
        return contextlib.nullcontext()
