// The SIMT stand-in of the test suite (tests/_cuda_emu.py, HostBackend(threads=N)): the
// prelude under which the kernels' GPU branches compile for the host, each thread of a block
// a fiber, scheduled by sg_emu::run (see the module docstring there).
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
#define __noinline__ __attribute__((noinline))
#define __global__
#define __launch_bounds__(...)
// Shared memory: one copy for all the block's threads (blocks run one at a time). Volatile,
// so that the compiler reloads it after a barrier (a barrier is a function call it might
// otherwise see through for a variable whose address never escapes).
#define __shared__ static volatile
#define SG_SHARED_PTR volatile  // (kernels/segmented.cuh: pointers to __shared__)
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
        const double w = watchdog_s;  // (0.001 to 1e6: HostBackend checks)
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
#include "sg_emu_atomics.h"
