// emu.cpp: the runtime of the emulated CUDA device (cargo feature `emulator`; see emu.cuh).
//
// Execution model
// - A launch runs its blocks in order x, then y, then z, on the calling OS thread (or on
//   TUNA_EMU_THREADS worker threads taking blocks from a shared counter). Concurrent launches
//   from several OS threads are independent: all per-launch and per-block state lives in
//   objects owned by the launch/worker, fiber stacks in a thread_local pool.
// - Within a block, every CUDA thread is a fiber with its own stack (x86-64: a 20-instruction
//   context switch below; elsewhere, or with -DTUNA_EMU_UCONTEXT, ucontext). A scheduler loop
//   (on the worker's own stack) runs ready fibers in FIFO order; a fiber runs until it exits or
//   blocks at a barrier, then control returns to the scheduler. Stacks come from a free list, so
//   a fiber that never blocks hands its (cache-hot) stack to the next one.
// - __syncthreads: a block barrier. It completes when all threads of the block wait at it, at
//   the same call site. A thread that exits while others wait (or that others reach after it
//   exited), or threads at two different __syncthreads sites, are a fault (error 3).
// - warp ops (shuffles, votes, __syncwarp): a barrier per warp over the op's mask. Each lane
//   deposits its value; the last lane of the mask to arrive completes the op and wakes the
//   others; the completing lane writes every lane's result into that lane's own slot before any
//   of them runs again, so a fast lane's next op never overwrites what a slow lane still reads.
//   Lanes of the mask that do not exist (a partial last warp) are an invalid launch (error 2);
//   lanes that exited, a lane outside its own mask, a shuffle from a lane outside the mask,
//   or a different op/mask joining an op in flight are faults (error 3).
// - No runnable fiber while some have not exited: a deadlock, reported with where each waits.
// - Shared memory: per block, a fresh malloc of exactly the launch's dyn_smem bytes and one per
//   static __shared__ declaration, filled with 0xff (NaN), freed when the block ends (so
//   AddressSanitizer sees overruns of either).
// - Tensor-core primitives (kernels/mma.cuh), from the PTX ISA manual:
//   * mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 and ldmatrix.sync.aligned.m8n8.x{1,2,4}
//     {.trans}.shared.b16 are warp ops (as above) over the full warp (.sync.aligned: every lane,
//     at the same call site, with the same variant; a lane that exited, waits elsewhere or runs
//     another variant is a fault, a partial warp an invalid launch). Each lane deposits a pointer
//     to its operands on its own stack; the lane completing the op gathers the fragments into
//     whole matrices by the manual's layouts and writes every lane's result back.
//   * mma: D = A*B + C with the bf16 products exact (8-bit significands, exact in f32 and double)
//     and the 16 products plus C summed in double in k order, then rounded once to f32 (nearest
//     even). The double sum is exact while the terms lie within about 2^24 of each other in
//     magnitude, and otherwise off by a few double ulps of the largest term, far below f32's: in
//     effect the exact sum rounded once. The device's tensor cores do not document their internal
//     rounding (not an IEEE f32 sequence of adds either), so device and emulator agree to a few
//     f32 ulps of the largest term, not bitwise: compare against the device with a tolerance.
//   * ldmatrix: lanes 0..8*num-1 each give one 16-byte row (8 b16 values) of matrix lane/8; the
//     address must be 16-byte aligned and inside the block's shared memory (else a fault naming
//     the lane). Lane l receives, per matrix, the b16 pair (row l/4, cols 2*(l%4), +1), low half
//     first; with .trans the pair (rows 2*(l%4), +1; col l/4).
//   * cp.async (per thread, not collective): 4/8/16 bytes (.cg: 16 only), source and destination
//     aligned to the size, destination inside the block's shared memory, source outside it (else a
//     fault). The source is read at the call, the destination filled with 0xff (NaN) at once, and
//     the data written only when this thread's cp.async.wait_group/wait_all completes its group:
//     reading the destination before the matching wait (or, from another thread, before that
//     wait and a barrier) sees NaN, as a kernel that forgets the wait would see stale data on the
//     device. Copies still pending when the thread exits are dropped.
#include "emu.cuh"

#include <cerrno>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define TUNA_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TUNA_EMU_ASAN 1
#endif
#endif
#ifdef TUNA_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !(defined(__x86_64__) && defined(__ELF__)) && !defined(TUNA_EMU_UCONTEXT)
#define TUNA_EMU_UCONTEXT 1
#endif
#ifdef TUNA_EMU_UCONTEXT
#include <ucontext.h>
#endif

#define TUNA_EMU_API extern "C" __attribute__((visibility("default")))

namespace tuna_emu {

// The generated registry (build.rs): every compiled .cu module.
extern const Module* const modules[];
extern const size_t module_count;

__thread ThreadCtx* cur = nullptr;

namespace {

constexpr unsigned MAX_THREADS = 1024;
constexpr size_t MAX_DYN_SMEM = 227 * 1024;    // sm_80/sm_90 opt-in maximum per block
constexpr size_t MAX_STATIC_SMEM = 48 * 1024;  // static __shared__ limit

// ---- context switch -------------------------------------------------------------------------
#ifndef TUNA_EMU_UCONTEXT
extern "C" void tuna_emu_ctx_swap(void** save_sp, void* to_sp);
extern "C" void tuna_emu_ctx_start();
// tuna_emu_ctx_swap(save, to): push the callee-saved registers on the current stack, store the
// stack pointer in *save, load `to` and pop the same from there. (MXCSR and the x87 control word
// are not switched: every fiber of a worker shares its floating-point environment, which kernel
// code never changes.) A fresh stack (ctx_init) is laid out so that the first swap "returns"
// into tuna_emu_ctx_start, which calls r12(r13) and never returns.
asm(R"(
    .text
    .p2align 4
    .globl tuna_emu_ctx_swap
    .hidden tuna_emu_ctx_swap
    .type tuna_emu_ctx_swap,@function
tuna_emu_ctx_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size tuna_emu_ctx_swap, .-tuna_emu_ctx_swap

    .p2align 4
    .globl tuna_emu_ctx_start
    .hidden tuna_emu_ctx_start
    .type tuna_emu_ctx_start,@function
tuna_emu_ctx_start:
    .cfi_startproc
    .cfi_undefined rip
    xorl %ebp, %ebp
    movq %r13, %rdi
    andq $-16, %rsp
    callq *%r12
    ud2
    .cfi_endproc
    .size tuna_emu_ctx_start, .-tuna_emu_ctx_start
)");

struct Context {
    void* sp = nullptr;
};
inline void ctx_switch(Context& from, Context& to) { tuna_emu_ctx_swap(&from.sp, to.sp); }
inline void* ctx_sp(const Context& c) { return c.sp; }
void ctx_init(Context& c, char* lo, size_t size, void (*fn)(void*), void* arg) {
    uint64_t* sp = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(lo + size)) & ~uintptr_t(15));
    *--sp = 0;                                                // alignment slot
    *--sp = reinterpret_cast<uint64_t>(&tuna_emu_ctx_start);  // "return address" of the first swap
    *--sp = 0;                                                // rbp
    *--sp = 0;                                                // rbx
    *--sp = reinterpret_cast<uint64_t>(fn);                   // r12
    *--sp = reinterpret_cast<uint64_t>(arg);                  // r13
    *--sp = 0;                                                // r14
    *--sp = 0;                                                // r15
    c.sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};
inline void ctx_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void* ctx_sp(const Context&) { return nullptr; }  // unknown: the whole stack
void fiber_main(void* p);
void uc_entry(unsigned hi, unsigned lo) {
    fiber_main(reinterpret_cast<void*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
    abort();
}
void ctx_init(Context& c, char* lo, size_t size, void (*)(void*), void* arg) {  // always fiber_main
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = lo;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    const uintptr_t a = reinterpret_cast<uintptr_t>(arg);
    makecontext(&c.uc, reinterpret_cast<void (*)()>(uc_entry), 2, unsigned(a >> 32), unsigned(a & 0xffffffffu));
}
#endif

#ifdef TUNA_EMU_ASAN
inline void asan_start(void** fake, const void* bottom, size_t size) { __sanitizer_start_switch_fiber(fake, bottom, size); }
inline void asan_finish(void* fake, const void** bottom, size_t* size) {
    __sanitizer_finish_switch_fiber(fake, bottom, size);
}
inline void asan_unpoison(void* p, size_t n) { __asan_unpoison_memory_region(p, n); }
constexpr size_t DEFAULT_STACK = 512 * 1024;
#else
inline void asan_start(void**, const void*, size_t) {}
inline void asan_finish(void*, const void**, size_t*) {}
inline void asan_unpoison(void*, size_t) {}
constexpr size_t DEFAULT_STACK = 64 * 1024;
#endif

// ---- configuration (environment, read once) --------------------------------------------------
// A positive integer setting in [1, max], or `dflt` when unset or empty. Anything else (not a
// number, 0, negative, above max) is refused by name: the process stops with the reason, since a
// setting that silently falls back would make a run that is not the one asked for.
size_t env_num(const char* name, size_t dflt, size_t max) {
    const char* v = getenv(name);
    if (!v || !*v) return dflt;
    char* end = nullptr;
    errno = 0;
    const unsigned long long n = strtoull(v, &end, 10);
    if (v[0] == '-' || errno || !end || *end || n == 0 || n > max) {
        fprintf(stderr, "tuna emulator: %s=%s: expected a whole number from 1 to %zu\n", name, v, max);
        exit(2);
    }
    return size_t(n);
}
struct Config {
    size_t stack_bytes;
    unsigned workers;
    bool reverse;
    Config() {
        const size_t page = size_t(sysconf(_SC_PAGESIZE));
        stack_bytes = (env_num("TUNA_EMU_STACK_KB", DEFAULT_STACK / 1024, 1 << 20) * 1024 + page - 1) / page * page;
        workers = unsigned(env_num("TUNA_EMU_THREADS", 1, 64));
        const char* s = getenv("TUNA_EMU_SCHEDULE");
        reverse = s && std::string_view(s) == "reverse";
    }
};
const Config& config() {
    static const Config c;
    return c;
}

// ---- fiber stacks: a per-OS-thread pool, each with a guard page below -------------------------
struct Stack {
    char* lo = nullptr;  // usable [lo, lo + size)
    size_t size = 0;
};
struct Pool {
    std::vector<Stack> free_, all_;
    size_t page = size_t(sysconf(_SC_PAGESIZE));
    ~Pool() {
        for (const Stack& s : all_) munmap(s.lo - page, s.size + page);
    }
    Stack get() {
        if (!free_.empty()) {
            Stack s = free_.back();
            free_.pop_back();
            return s;
        }
        const size_t size = config().stack_bytes;
        void* m = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            fprintf(stderr, "tuna emulator: cannot map a %zu-byte fiber stack\n", size);
            abort();
        }
        mprotect(m, page, PROT_NONE);  // overflow faults instead of corrupting the next stack
        Stack s{static_cast<char*>(m) + page, size};
        all_.push_back(s);
        return s;
    }
    // `sp`: where the stack's last fiber stopped. Under ASan, the frames above it never returned
    // (the fiber ended or was abandoned), so their redzones are still poisoned: unpoison them, as
    // ASan's prologues expect unused stack to be.
    void put(Stack s, void* sp) {
        char* from = static_cast<char*>(sp);
        if (!from || from < s.lo || from > s.lo + s.size) from = s.lo;
        from = std::max(s.lo, from - 256);
        asan_unpoison(from, size_t(s.lo + s.size - from));
        free_.push_back(s);
    }
};
thread_local Pool pool;

// ---- per-launch, per-block, per-thread state ---------------------------------------------------
enum class St : uint8_t { Fresh, Ready, Running, Bar, Warp, Done, Dead };

struct Launch {
    const KernelEntry* k;
    void* const* args;
    Dim3 grid, block;
    size_t dyn;
    unsigned long long nblocks;
    std::atomic<unsigned long long> next{0};
    std::atomic<bool> failed{false};
    std::mutex mu;
    int code = 0;
    std::string msg;
};

struct Thread : ThreadCtx {
    Context ctx;
    Stack stack;
    St st = St::Fresh;
    uint64_t result = 0;         // of the last warp op
    // cp.async: copies issued and not yet completed (in issue order), and commit_groups so far;
    // a copy belongs to group `committed` at issue (the next group to be committed).
    struct AsyncCopy {
        void* dst;
        unsigned bytes, group;
        unsigned char data[16];
    };
    std::vector<AsyncCopy> async;
    unsigned committed = 0;
    const char* site = nullptr;  // where it waits
    void* fake = nullptr;        // ASan's fake stack while switched out
};

// A warp op in flight: the lanes of `mask` that have joined so far and their operands.
struct PendingOp {
    unsigned mask, arrived, first;
    int kind;
    const char* site;
    uint64_t val[32];
    unsigned param[32], width[32];
};
constexpr unsigned MAX_WARP_OPS = 4;  // ops with different masks in flight at once in one warp
struct Warp {
    unsigned exists = 0, exited = 0, nops = 0;
    PendingOp ops[MAX_WARP_OPS];
};

struct Block : BlockCtx {
    Launch* L = nullptr;
    unsigned n = 0;
    std::vector<Thread> th;
    std::vector<Warp> warps;
    std::vector<unsigned> rq;  // ring of ready threads (each queued at most once), MAX_THREADS long
    unsigned rq_head = 0, rq_len = 0;
    unsigned done = 0, first_done = 0;
    unsigned bar_count = 0, bar_first = 0;
    const char* bar_site = nullptr;
    void* dyn = nullptr;
    bool dyn_alloc = false;
    struct Static {
        const void* tag;
        void* p;
        size_t bytes;
    };
    std::vector<Static> statics;
    size_t static_bytes = 0;
    Context sched;
    void* sched_fake = nullptr;
    const void* sched_bottom = nullptr;  // the scheduler's stack (ASan), learned on its first switch
    size_t sched_size = 0;
    bool from_sched = false;  // the switch in progress leaves the scheduler
    Stack pending;            // the stack of a fiber that ended, released once switched away from
    Context* pending_ctx = nullptr;
    bool failed = false;
    int code = 0;
    std::string msg;

    static constexpr unsigned RQ_MASK = MAX_THREADS - 1;
    void push(unsigned i) {
        rq[(rq_head + rq_len) & RQ_MASK] = i;
        ++rq_len;
    }
    void push_front(unsigned i) {
        rq_head = (rq_head - 1) & RQ_MASK;
        rq[rq_head] = i;
        ++rq_len;
    }
    unsigned pop() {
        const unsigned i = rq[rq_head];
        rq_head = (rq_head + 1) & RQ_MASK;
        --rq_len;
        return i;
    }
};

inline Thread& self() { return *static_cast<Thread*>(cur); }
inline Block& blk_of(Thread& t) { return *static_cast<Block*>(t.blk); }

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}
std::string where(const Block& b, const Thread& t) {
    return fmt("kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", b.L->k->name, b.bid.x, b.bid.y, b.bid.z, t.tid.x,
               t.tid.y, t.tid.z);
}
std::string tid_str(const Thread& t) { return fmt("(%u,%u,%u)", t.tid.x, t.tid.y, t.tid.z); }
const char* op_name(int kind) {
    switch (kind) {
        case OP_SHFL_IDX: return "__shfl_sync";
        case OP_SHFL_XOR: return "__shfl_xor_sync";
        case OP_SHFL_DOWN: return "__shfl_down_sync";
        case OP_SHFL_UP: return "__shfl_up_sync";
        case OP_BALLOT: return "__ballot_sync";
        case OP_ANY: return "__any_sync";
        case OP_ALL: return "__all_sync";
        case OP_SYNCWARP: return "__syncwarp";
        case OP_MMA_BF16: return "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";
        case OP_LDMATRIX: return "ldmatrix.sync.aligned.m8n8";
        default: return "warp op";
    }
}
bool same_site(const char* a, const char* b) { return a == b || (a && b && strcmp(a, b) == 0); }

void fiber_main(void* p);

// Runs on a fiber's stack right after a switch to it (ASan bookkeeping; the stack of a fiber that
// ended is free now that nothing runs on it).
void arrived(Block& b, void* fake) {
    const void* bottom = nullptr;
    size_t size = 0;
    asan_finish(fake, &bottom, &size);
    if (b.from_sched) {
        b.sched_bottom = bottom;
        b.sched_size = size;
        b.from_sched = false;
    }
    if (b.pending.lo) {
        pool.put(b.pending, ctx_sp(*b.pending_ctx));
        b.pending = Stack{};
    }
}

// Fiber `t` stops running (it waits, ended or faulted): switch straight to the next ready fiber,
// or back to the scheduler when none is (or the block failed). Returns when t is resumed.
void switch_away(Thread& t, bool finished) {
    Block& b = blk_of(t);
    Context* to = &b.sched;
    const void* bottom = b.sched_bottom;
    size_t size = b.sched_size;
    cur = nullptr;
    if (!b.failed && b.rq_len) {
        Thread& next = b.th[b.pop()];
        if (next.st == St::Fresh) {
            next.stack = pool.get();
            ctx_init(next.ctx, next.stack.lo, next.stack.size, fiber_main, &next);
        }
        next.st = St::Running;
        cur = &next;
        to = &next.ctx;
        bottom = next.stack.lo;
        size = next.stack.size;
    }
    if (finished) {
        b.pending = t.stack;  // released by whoever runs next
        b.pending_ctx = &t.ctx;
        t.stack = Stack{};
    }
    asan_start(finished ? nullptr : &t.fake, bottom, size);
    ctx_switch(t.ctx, *to);
    arrived(b, t.fake);
}

// Ends the fiber with an error; the block is abandoned.
[[noreturn]] void fail(int code, std::string msg) {
    Thread& t = self();
    Block& b = blk_of(t);
    if (!b.failed) {
        b.failed = true;
        b.code = code;
        b.msg = std::move(msg);
    }
    t.st = St::Dead;
    switch_away(t, true);
    __builtin_unreachable();
}

void thread_exit(Thread& t) {
    Block& b = blk_of(t);
    Warp& w = b.warps[t.lin / 32];
    const unsigned bit = 1u << t.lane;
    if (b.bar_count) {
        fail(3, fmt("%s exited while %u thread(s) wait at __syncthreads (%s), e.g. thread %s: a barrier in divergent "
                    "code (a thread that returns early must not skip a __syncthreads the others reach)",
                    where(b, t).c_str(), b.bar_count, b.bar_site, tid_str(b.th[b.bar_first]).c_str()));
    }
    for (unsigned i = 0; i < w.nops; ++i) {
        const PendingOp& op = w.ops[i];
        if (op.mask & bit)
            fail(3, fmt("%s exited while lanes 0x%08x of its warp wait for it at %s (%s, mask 0x%08x): a warp op with "
                        "inactive lanes",
                        where(b, t).c_str(), op.arrived, op_name(op.kind), op.site, op.mask));
    }
    w.exited |= bit;
    if (b.done++ == 0) b.first_done = t.lin;
    t.st = St::Done;
}

void fiber_main(void* p) {
    Thread& t = *static_cast<Thread*>(p);
    Block& b = blk_of(t);
    arrived(b, nullptr);
    // An exception cannot unwind past a fiber's entry (there is no caller frame): one thrown by
    // the kernel's host code (bad_alloc, ...) becomes this launch's fault instead of terminate().
    std::string thrown;
    try {
        b.L->k->run(b.L->args);
    } catch (const std::exception& e) {
        thrown = e.what();
    } catch (...) {
        thrown = "a non-standard exception";
    }
    if (!thrown.empty()) fail(3, "emulator internal error in a kernel thread: " + thrown);
    thread_exit(t);
    switch_away(t, true);
    __builtin_unreachable();
}

void* alloc_poisoned(size_t bytes, size_t align) {
    // At least one byte, so the pointer is always a real (freeable) allocation: malloc(0) may
    // return null, and a kernel that declares dynamic shared memory may be launched with none.
    const size_t n = bytes ? bytes : 1;
    void* p = nullptr;
    if (align <= alignof(std::max_align_t)) {
        p = malloc(n);
    } else if (posix_memalign(&p, align, n) != 0) {
        p = nullptr;
    }
    if (!p) {
        fprintf(stderr, "tuna emulator: out of memory allocating %zu bytes of shared memory\n", n);
        abort();
    }
    memset(p, 0xff, n);
    return p;
}

void release_smem(Block& b) {
    if (b.dyn_alloc && b.dyn) free(b.dyn);
    b.dyn = nullptr;
    b.dyn_alloc = false;
    for (auto& st : b.statics) free(st.p);
    b.statics.clear();
    b.static_bytes = 0;
}

std::string deadlock_report(Block& b) {
    std::string s = fmt("deadlock in kernel %s, block (%u,%u,%u): no thread can run;", b.L->k->name, b.bid.x, b.bid.y,
                        b.bid.z);
    if (b.bar_count)
        s += fmt(" %u thread(s) wait at __syncthreads (%s), e.g. thread %s;", b.bar_count, b.bar_site,
                 tid_str(b.th[b.bar_first]).c_str());
    for (size_t wi = 0; wi < b.warps.size(); ++wi) {
        const Warp& w = b.warps[wi];
        for (unsigned i = 0; i < w.nops; ++i) {
            const PendingOp& op = w.ops[i];
            s += fmt(" warp %zu: lanes 0x%08x wait at %s (%s, mask 0x%08x), e.g. thread %s;", wi, op.arrived,
                     op_name(op.kind), op.site, op.mask, tid_str(b.th[op.first]).c_str());
            const unsigned missing = op.mask & ~op.arrived;
            for (unsigned l = 0; l < 32; ++l) {
                if (!(missing >> l & 1u)) continue;
                const Thread& o = b.th[wi * 32 + l];
                s += fmt(" its lane %u, thread %s, waits at %s;", l, tid_str(o).c_str(),
                         o.st == St::Bar ? "__syncthreads" : "another warp op");
                s += fmt(" (%s)", o.site ? o.site : "?");
                break;
            }
        }
    }
    if (b.done) s += fmt(" %u thread(s) exited, e.g. thread %s", b.done, tid_str(b.th[b.first_done]).c_str());
    return s;
}

void setup_block(Block& b, Launch& L, unsigned long long idx) {
    b.L = &L;
    b.gdim = L.grid;
    b.bdim = L.block;
    b.bid = Dim3{unsigned(idx % L.grid.x), unsigned((idx / L.grid.x) % L.grid.y),
                 unsigned(idx / (unsigned long long)L.grid.x / L.grid.y)};
    const unsigned n = L.block.x * L.block.y * L.block.z;
    b.n = n;
    if (b.th.size() < n) b.th.resize(n);
    if (b.rq.size() < MAX_THREADS) b.rq.resize(MAX_THREADS);
    const unsigned nw = (n + 31) / 32;
    b.warps.resize(nw);
    for (unsigned w = 0; w < nw; ++w) {
        Warp& x = b.warps[w];
        const unsigned lanes = std::min(32u, n - w * 32);
        x.exists = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
        x.exited = x.nops = 0;
    }
    unsigned i = 0;
    for (unsigned z = 0; z < L.block.z; ++z)
        for (unsigned y = 0; y < L.block.y; ++y)
            for (unsigned x = 0; x < L.block.x; ++x, ++i) {
                Thread& t = b.th[i];
                t.tid = Dim3{x, y, z};
                t.blk = &b;
                t.lin = i;
                t.lane = i & 31;
                t.st = St::Fresh;
                t.site = nullptr;
                t.fake = nullptr;
                t.stack = Stack{};
                t.async.clear();
                t.committed = 0;
            }
    b.rq_head = b.rq_len = 0;
    for (unsigned k = 0; k < n; ++k) b.push(config().reverse ? n - 1 - k : k);
    b.done = b.first_done = 0;
    b.bar_count = b.bar_first = 0;
    b.bar_site = nullptr;
    b.dyn = nullptr;
    b.dyn_alloc = false;
    b.from_sched = false;
    b.pending = Stack{};
    b.failed = false;
    b.code = 0;
    b.msg.clear();
}

void run_block(Block& b) {
    // Fibers switch among themselves; control comes back here when none is ready (normally:
    // all ended) or the block failed.
    while (b.rq_len && !b.failed) {
        Thread& t = b.th[b.pop()];
        if (t.st == St::Fresh) {
            t.stack = pool.get();
            ctx_init(t.ctx, t.stack.lo, t.stack.size, fiber_main, &t);
        }
        t.st = St::Running;
        cur = &t;
        b.from_sched = true;
        asan_start(&b.sched_fake, t.stack.lo, t.stack.size);
        ctx_switch(b.sched, t.ctx);
        asan_finish(b.sched_fake, nullptr, nullptr);
        cur = nullptr;
        if (b.pending.lo) {
            pool.put(b.pending, ctx_sp(*b.pending_ctx));
            b.pending = Stack{};
        }
    }
    if (!b.failed && b.done < b.n) {
        b.failed = true;
        b.code = 3;
        b.msg = deadlock_report(b);
    }
    if (b.failed) {
        // Abandoned fibers: their stacks go back to the pool (ASan: with their frames unpoisoned).
        for (unsigned i = 0; i < b.n; ++i) {
            Thread& t = b.th[i];
            if (t.stack.lo) {
                pool.put(t.stack, ctx_sp(t.ctx));
                t.stack = Stack{};
            }
        }
    }
    release_smem(b);
}

void worker(Launch& L) {
    thread_local std::unique_ptr<Block> cached;
    if (!cached) cached = std::make_unique<Block>();
    Block& b = *cached;
    while (!L.failed.load(std::memory_order_relaxed)) {
        const unsigned long long idx = L.next.fetch_add(1, std::memory_order_relaxed);
        if (idx >= L.nblocks) break;
        setup_block(b, L, idx);
        run_block(b);
        if (b.failed) {
            std::lock_guard<std::mutex> g(L.mu);
            if (!L.code) {
                L.code = b.code;
                L.msg = b.msg;
            }
            L.failed = true;
        }
    }
    b.L = nullptr;
}

// ---- registry -------------------------------------------------------------------------------------
struct Registry {
    std::vector<const KernelEntry*> kernels;
    std::unordered_map<std::string_view, size_t> by_name;
    std::unordered_map<std::string_view, const StructEntry*> structs;
    std::vector<const StructEntry*> struct_list;
    std::unique_ptr<std::atomic<unsigned long long>[]> launches;
    Registry() {
        for (size_t m = 0; m < module_count; ++m) {
            const Module& mod = *modules[m];
            for (size_t i = 0; i < mod.nkernels; ++i) {
                if (by_name.emplace(mod.kernels[i].name, kernels.size()).second) kernels.push_back(&mod.kernels[i]);
            }
            for (size_t i = 0; i < mod.nstructs; ++i) {
                if (structs.emplace(mod.structs[i].name, &mod.structs[i]).second) struct_list.push_back(&mod.structs[i]);
            }
        }
        launches.reset(new std::atomic<unsigned long long>[kernels.size()]);
        for (size_t i = 0; i < kernels.size(); ++i) launches[i] = 0;
    }
};
const Registry& reg() {
    static const Registry r;
    return r;
}

void write_err(char* err, size_t len, const std::string& msg) {
    if (!err || !len) return;
    const size_t n = std::min(len - 1, msg.size());
    memcpy(err, msg.data(), n);
    err[n] = 0;
}

int launch(const char* name, const unsigned grid[3], const unsigned block[3], unsigned dyn, void** args,
           std::string& msg) {
    if (!name) {
        msg = "unknown kernel (null name)";
        return 1;
    }
    const Registry& r = reg();
    const auto it = r.by_name.find(name);
    if (it == r.by_name.end()) {
        msg = fmt("unknown kernel '%s': not an extern \"C\" __global__ function of any compiled kernels/*.cu", name);
        return 1;
    }
    const KernelEntry& k = *r.kernels[it->second];
    if (!grid || !block) {
        msg = fmt("invalid launch of kernel %s: null grid or block", name);
        return 2;
    }
    const unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
    if (!grid[0] || !grid[1] || !grid[2] || grid[0] > 0x7fffffffu || grid[1] > 65535 || grid[2] > 65535) {
        msg = fmt("invalid launch of kernel %s: grid (%u,%u,%u) (each dim >= 1; x < 2^31, y and z <= 65535)", name, grid[0],
                  grid[1], grid[2]);
        return 2;
    }
    if (!threads || block[0] > 1024 || block[1] > 1024 || block[2] > 64 || threads > MAX_THREADS) {
        msg = fmt("invalid launch of kernel %s: block (%u,%u,%u) (each dim >= 1; x, y <= 1024, z <= 64, at most 1024 "
                  "threads)",
                  name, block[0], block[1], block[2]);
        return 2;
    }
    if (k.max_threads && threads > k.max_threads) {
        msg = fmt("invalid launch of kernel %s: block of %llu threads exceeds its __launch_bounds__(%u)", name, threads,
                  k.max_threads);
        return 2;
    }
    if (dyn > MAX_DYN_SMEM) {
        msg = fmt("invalid launch of kernel %s: %u bytes of dynamic shared memory exceed %zu", name, dyn, MAX_DYN_SMEM);
        return 2;
    }
    if (k.nparams && !args) {
        msg = fmt("invalid launch of kernel %s: null args for %u parameters", name, k.nparams);
        return 2;
    }
    for (unsigned i = 0; i < k.nparams; ++i) {
        if (!args[i]) {
            msg = fmt("invalid launch of kernel %s: args[%u] is null (it must point at the argument's value)", name, i);
            return 2;
        }
    }
    r.launches[it->second].fetch_add(1, std::memory_order_relaxed);

    Launch L;
    L.k = &k;
    L.args = args;
    L.grid = Dim3{grid[0], grid[1], grid[2]};
    L.block = Dim3{block[0], block[1], block[2]};
    L.dyn = dyn;
    L.nblocks = (unsigned long long)grid[0] * grid[1] * grid[2];
    const unsigned nw = unsigned(std::min<unsigned long long>(config().workers, L.nblocks));
    std::vector<std::thread> helpers;
    for (unsigned i = 1; i < nw; ++i) helpers.emplace_back([&L] { worker(L); });
    worker(L);
    for (auto& h : helpers) h.join();
    if (L.code) {
        msg = L.msg;
        return L.code;
    }
    return 0;
}

// ---- tensor-core primitives (see the top of this file) ---------------------------------------------
std::string ldmatrix_variant(int kind, unsigned param) {
    if (kind != OP_LDMATRIX) return "";
    return fmt(".x%u%s.shared.b16", param & 7u, (param & 16u) ? ".trans" : "");
}

// [p, p + n) inside one of the block's shared-memory allocations (dynamic, or a static array)
bool in_shared(const Block& b, const void* p, size_t n) {
    const auto inside = [&](const void* base, size_t bytes) {
        const uintptr_t a = reinterpret_cast<uintptr_t>(p), lo = reinterpret_cast<uintptr_t>(base);
        return base && a >= lo && a - lo <= bytes && n <= bytes - (a - lo);
    };
    if (b.dyn && inside(b.dyn, b.L->dyn)) return true;
    for (const auto& st : b.statics)
        if (inside(st.p, st.bytes)) return true;
    return false;
}

float bf16_half(uint32_t reg, unsigned hi) { return std::bit_cast<float>((hi ? reg >> 16 : reg & 0xffffu) << 16); }

// mma.m16n8k16 .bf16 fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"): groupID = lane >> 2, threadID_in_group = lane % 4;
//   A (16x16) a0..a7, two per register, low half first: row = groupID (+8 for a2,a3,a6,a7),
//     col = threadID_in_group * 2 + (i & 1) (+8 for a4..a7);
//   B (16x8)  b0..b3: row = threadID_in_group * 2 + (i & 1) (+8 for b2,b3), col = groupID;
//   C, D (16x8) c0..c3: row = groupID (+8 for c2,c3), col = threadID_in_group * 2 + (i & 1).
void mma_complete(const PendingOp& op) {
    MmaIo* io[32];
    for (unsigned l = 0; l < 32; ++l) io[l] = reinterpret_cast<MmaIo*>(static_cast<uintptr_t>(op.val[l]));
    float A[16][16], B[16][8], C[16][8];
    for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l >> 2, tg = l & 3;
        for (unsigned i = 0; i < 8; ++i)
            A[g + ((i & 2) ? 8 : 0)][tg * 2 + (i & 1) + (i >= 4 ? 8 : 0)] = bf16_half(io[l]->a[i >> 1], i & 1);
        for (unsigned i = 0; i < 4; ++i) {
            B[tg * 2 + (i & 1) + (i >= 2 ? 8 : 0)][g] = bf16_half(io[l]->b[i >> 1], i & 1);
            C[g + (i >= 2 ? 8 : 0)][tg * 2 + (i & 1)] = io[l]->c[i];
        }
    }
    for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l >> 2, tg = l & 3;
        for (unsigned i = 0; i < 4; ++i) {
            const unsigned row = g + (i >= 2 ? 8 : 0), col = tg * 2 + (i & 1);
            double s = C[row][col];
            for (unsigned k = 0; k < 16; ++k) s += double(A[row][k]) * double(B[k][col]);
            io[l]->d[i] = float(s);
        }
    }
}

// ldmatrix.m8n8.x{1,2,4}{.trans}.b16: lane 8*m + r gives row r of matrix m.
void ldmatrix_complete(Block& b, unsigned wi, const PendingOp& op, unsigned param) {
    const unsigned num = param & 7u;
    const bool trans = param & 16u;
    uint16_t M[4][8][8];
    for (unsigned l = 0; l < 8 * num; ++l) {
        const void* row = reinterpret_cast<const LdmatrixIo*>(static_cast<uintptr_t>(op.val[l]))->row;
        const Thread& o = b.th[wi * 32 + l];
        if (reinterpret_cast<uintptr_t>(row) % 16) {
            fail(3, fmt("%s: %s%s (%s): lane %u's row address %p is not 16-byte aligned", where(b, o).c_str(),
                        op_name(OP_LDMATRIX), ldmatrix_variant(OP_LDMATRIX, param).c_str(), op.site, l, row));
        }
        if (!in_shared(b, row, 16)) {
            fail(3, fmt("%s: %s%s (%s): lane %u's row address %p (16 bytes) is not inside the block's shared memory",
                        where(b, o).c_str(), op_name(OP_LDMATRIX), ldmatrix_variant(OP_LDMATRIX, param).c_str(),
                        op.site, l, row));
        }
        memcpy(M[l / 8][l % 8], row, 16);
    }
    for (unsigned l = 0; l < 32; ++l) {
        LdmatrixIo* io = reinterpret_cast<LdmatrixIo*>(static_cast<uintptr_t>(op.val[l]));
        const unsigned g = l >> 2, c = (l & 3) * 2;
        for (unsigned m = 0; m < num; ++m) {
            const uint32_t lo = trans ? M[m][c][g] : M[m][g][c], hi = trans ? M[m][c + 1][g] : M[m][g][c + 1];
            io->r[m] = lo | hi << 16;
        }
    }
}

}  // namespace

// ---- entry points of kernel code (emu.cuh) ------------------------------------------------------------
void syncthreads(const char* site) {
    Thread& t = self();
    Block& b = blk_of(t);
    if (b.done) {
        fail(3, fmt("%s reached __syncthreads (%s) after %u thread(s) of the block exited, e.g. thread %s: a barrier "
                    "in divergent code",
                    where(b, t).c_str(), site, b.done, tid_str(b.th[b.first_done]).c_str()));
    }
    if (b.bar_count == 0) {
        b.bar_site = site;
        b.bar_first = t.lin;
    } else if (!same_site(site, b.bar_site)) {
        fail(3, fmt("%s waits at __syncthreads (%s) while thread %s waits at a different __syncthreads (%s): divergent "
                    "barriers",
                    where(b, t).c_str(), site, tid_str(b.th[b.bar_first]).c_str(), b.bar_site));
    }
    t.site = site;
    if (++b.bar_count == b.n) {
        b.bar_count = 0;
        const bool rev = config().reverse;
        for (unsigned k = 0; k < b.n; ++k) {
            const unsigned i = rev ? b.n - 1 - k : k;
            if (b.th[i].st == St::Bar) {
                b.th[i].st = St::Ready;
                b.push(i);
            }
        }
        return;  // the last thread to arrive runs on
    }
    t.st = St::Bar;
    switch_away(t, false);
}

uint64_t warp_op(const char* site, int kind, unsigned mask, uint64_t v, unsigned param, unsigned width) {
    Thread& t = self();
    Block& b = blk_of(t);
    const unsigned wi = t.lin / 32, bit = 1u << t.lane;
    Warp& w = b.warps[wi];
    if (mask & ~w.exists) {
        fail(2, fmt("invalid launch: %s: %s (%s) with mask 0x%08x, but warp %u has only %d lane(s) (0x%08x): the block "
                    "(%u threads) must be a multiple of 32 threads for this kernel's warp ops",
                    where(b, t).c_str(), op_name(kind), site, mask, wi, __builtin_popcount(w.exists), w.exists, b.n));
    }
    if (!(mask & bit))
        fail(3, fmt("%s: %s (%s) with mask 0x%08x, which excludes the calling lane %u", where(b, t).c_str(), op_name(kind),
                    site, mask, t.lane));
    if (mask & w.exited) {
        fail(3, fmt("%s: %s (%s) with mask 0x%08x, but lanes 0x%08x of the mask have exited: a warp op with inactive "
                    "lanes",
                    where(b, t).c_str(), op_name(kind), site, mask, mask & w.exited));
    }
    PendingOp* op = nullptr;
    for (unsigned i = 0; i < w.nops; ++i)
        if (w.ops[i].mask == mask) op = &w.ops[i];
    if (op) {
        if (op->kind != kind) {
            fail(3, fmt("%s: %s (%s) with mask 0x%08x while lanes 0x%08x of its warp wait at %s (%s) with the same mask: "
                        "divergent warp ops",
                        where(b, t).c_str(), op_name(kind), site, mask, op->arrived, op_name(op->kind), op->site));
        }
        // .aligned matrix ops: every lane executes the same instruction (site and variant)
        const unsigned first_param = op->param[op->first & 31];
        if ((kind == OP_MMA_BF16 || kind == OP_LDMATRIX) && (!same_site(site, op->site) || param != first_param)) {
            fail(3, fmt("%s: %s%s (%s) while lanes 0x%08x of its warp wait at %s%s (%s): a .sync.aligned op must be the "
                        "same instruction in every lane of the warp",
                        where(b, t).c_str(), op_name(kind), ldmatrix_variant(kind, param).c_str(), site, op->arrived,
                        op_name(op->kind), ldmatrix_variant(kind, first_param).c_str(), op->site));
        }
    } else {
        if (w.nops == MAX_WARP_OPS) {
            fail(3, fmt("%s: %s (%s) with mask 0x%08x: more than %u warp ops with different masks in flight in one warp "
                        "(an emulator limit)",
                        where(b, t).c_str(), op_name(kind), site, mask, MAX_WARP_OPS));
        }
        op = &w.ops[w.nops++];
        op->mask = mask;
        op->arrived = 0;
        op->first = t.lin;
        op->kind = kind;
        op->site = site;
    }
    op->val[t.lane] = v;
    op->param[t.lane] = param;
    op->width[t.lane] = width;
    op->arrived |= bit;
    if (op->arrived != mask) {
        t.site = site;
        t.st = St::Warp;
        switch_away(t, false);
        return t.result;  // written by the lane that completed the op
    }
    // Complete: every lane's result, then wake the others.
    if (kind == OP_MMA_BF16) mma_complete(*op);
    if (kind == OP_LDMATRIX) ldmatrix_complete(b, wi, *op, param);
    unsigned votes = 0;
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l & 1u) && op->val[l]) votes |= 1u << l;
    for (unsigned l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        Thread& o = b.th[wi * 32 + l];
        const unsigned wd = op->width[l], p = op->param[l], base = l & ~(wd - 1);
        unsigned src = l;
        switch (kind) {
            case OP_SHFL_IDX: src = base + (p & (wd - 1)); break;
            case OP_SHFL_XOR: src = (l ^ p) < base + wd ? l ^ p : l; break;  // later group: own value
            case OP_SHFL_DOWN: src = (l & (wd - 1)) + p < wd ? l + p : l; break;
            case OP_SHFL_UP: src = (l & (wd - 1)) >= p ? l - p : l; break;
            default: break;
        }
        switch (kind) {
            case OP_BALLOT: o.result = votes; break;
            case OP_ANY: o.result = votes != 0; break;
            case OP_ALL: o.result = votes == mask; break;
            case OP_SYNCWARP:
            case OP_MMA_BF16:
            case OP_LDMATRIX: o.result = 0; break;  // (the matrix ops wrote their lanes' outputs)
            default:
                if (!(mask >> src & 1u)) {
                    fail(3, fmt("%s: %s (%s) reads lane %u, which is not in mask 0x%08x (undefined on the device)",
                                where(b, o).c_str(), op_name(kind), site, src, mask));
                }
                o.result = op->val[src];
        }
    }
    // The other lanes run next (the warp stays hot in cache), in lane order.
    for (unsigned l = 32; l-- > 0;) {
        if (!(mask >> l & 1u) || l == t.lane) continue;
        Thread& o = b.th[wi * 32 + l];
        o.st = St::Ready;
        b.push_front(o.lin);
    }
    if (op != &w.ops[w.nops - 1]) *op = w.ops[w.nops - 1];  // remove (the others' order does not matter)
    --w.nops;
    return t.result;
}

void cp_async(const char* site, void* dst, const void* src, unsigned bytes, bool cg) {
    Thread& t = self();
    Block& b = blk_of(t);
    const char* name = cg ? "cp.async.cg.shared.global" : "cp.async.ca.shared.global";
    if (!(bytes == 4 || bytes == 8 || bytes == 16) || (cg && bytes != 16))
        fail(3, fmt("%s: %s (%s): %u bytes (.ca: 4, 8 or 16; .cg: 16)", where(b, t).c_str(), name, site, bytes));
    if (reinterpret_cast<uintptr_t>(dst) % bytes || reinterpret_cast<uintptr_t>(src) % bytes) {
        fail(3, fmt("%s: %s (%s) of %u bytes: destination %p and source %p must both be %u-byte aligned",
                    where(b, t).c_str(), name, site, bytes, dst, src, bytes));
    }
    if (!in_shared(b, dst, bytes)) {
        fail(3, fmt("%s: %s (%s): destination %p (%u bytes) is not inside the block's shared memory", where(b, t).c_str(),
                    name, site, dst, bytes));
    }
    if (in_shared(b, src, 1))
        fail(3, fmt("%s: %s (%s): source %p is in shared memory (it must be global)", where(b, t).c_str(), name, site, src));
    Thread::AsyncCopy c;
    c.dst = dst;
    c.bytes = bytes;
    c.group = t.committed;
    memcpy(c.data, src, bytes);
    t.async.push_back(c);
    memset(dst, 0xff, bytes);  // undefined until the wait: NaN
}

void cp_async_commit() { ++self().committed; }

void cp_async_wait(int n) {
    Thread& t = self();
    if (n < 0) {  // wait_all: commit_group, then wait_group 0
        ++t.committed;
        n = 0;
    }
    // committed groups are 0 .. committed-1; all but the newest n complete
    const unsigned done_below = t.committed > unsigned(n) ? t.committed - unsigned(n) : 0;
    size_t keep = 0;
    for (size_t i = 0; i < t.async.size(); ++i) {
        const Thread::AsyncCopy& c = t.async[i];
        if (c.group < done_below) memcpy(c.dst, c.data, c.bytes);
        else t.async[keep++] = c;
    }
    t.async.resize(keep);
}

unsigned activemask() {
    Thread& t = self();
    const Warp& w = blk_of(t).warps[t.lin / 32];
    return w.exists & ~w.exited;  // the lanes that have not exited (no notion of convergence here)
}

void fault(const char* site, const char* what) {
    Thread& t = self();
    fail(3, fmt("%s: %s at %s", where(blk_of(t), t).c_str(), what, site));
}

void* dyn_smem() {
    Thread& t = self();
    Block& b = blk_of(t);
    if (!b.dyn) {
        b.dyn = alloc_poisoned(b.L->dyn, 16);
        b.dyn_alloc = true;
    }
    return b.dyn;
}

void* static_smem(const void* tag, size_t bytes, size_t align, const char* name, const char* site) {
    Thread& t = self();
    Block& b = blk_of(t);
    for (const auto& st : b.statics)
        if (st.tag == tag) return st.p;
    if (b.static_bytes + bytes > MAX_STATIC_SMEM || b.static_bytes + bytes + b.L->dyn > MAX_DYN_SMEM) {
        fail(2, fmt("invalid launch: %s: __shared__ %s (%s, %zu bytes) brings static shared memory to %zu bytes (limit "
                    "%zu) with %zu dynamic bytes (limit %zu together)",
                    where(b, t).c_str(), name, site, bytes, b.static_bytes + bytes, MAX_STATIC_SMEM, b.L->dyn,
                    MAX_DYN_SMEM));
    }
    void* p = alloc_poisoned(bytes, align);
    b.statics.push_back({tag, p, bytes});
    b.static_bytes += bytes;
    return p;
}

}  // namespace tuna_emu

// ---- the C ABI ----------------------------------------------------------------------------------------
TUNA_EMU_API int tuna_emu_launch(const char* kernel, const unsigned grid[3], const unsigned block[3], unsigned dyn_smem,
                                 void** args, char* err, size_t err_len) {
    std::string msg;
    int rc;
    try {
        rc = tuna_emu::launch(kernel, grid, block, dyn_smem, args, msg);
    } catch (const std::exception& e) {
        msg = std::string("emulator internal error: ") + e.what();
        rc = 3;
    }
    if (rc) tuna_emu::write_err(err, err_len, msg);
    else if (err && err_len) err[0] = 0;
    return rc;
}

TUNA_EMU_API int tuna_emu_struct_layout(const char* name, unsigned long long* size, unsigned long long* offsets,
                                        size_t max_fields, size_t* nfields) {
    if (!name) return 1;
    const auto& r = tuna_emu::reg();
    const auto it = r.structs.find(name);
    if (it == r.structs.end()) return 1;
    const tuna_emu::StructEntry& s = *it->second;
    if (size) *size = s.size;
    if (offsets)
        for (size_t i = 0; i < s.nfields && i < max_fields; ++i) offsets[i] = s.offsets[i];
    if (nfields) *nfields = s.nfields;
    return 0;
}

TUNA_EMU_API size_t tuna_emu_kernel_count(void) { return tuna_emu::reg().kernels.size(); }

TUNA_EMU_API const char* tuna_emu_kernel_name(size_t i) {
    const auto& r = tuna_emu::reg();
    return i < r.kernels.size() ? r.kernels[i]->name : nullptr;
}

TUNA_EMU_API unsigned long long tuna_emu_launches(const char* kernel) {
    if (!kernel) return 0;
    const auto& r = tuna_emu::reg();
    const auto it = r.by_name.find(kernel);
    return it == r.by_name.end() ? 0 : r.launches[it->second].load(std::memory_order_relaxed);
}

// Extensions (not in the lead's ABI; used by the Rust shim's checks and the tests):
// the byte sizes of a kernel's parameters (returns the count, -1 if unknown; writes up to max),
TUNA_EMU_API long tuna_emu_kernel_params(const char* kernel, unsigned* sizes, size_t max) {
    if (!kernel) return -1;
    const auto& r = tuna_emu::reg();
    const auto it = r.by_name.find(kernel);
    if (it == r.by_name.end()) return -1;
    const tuna_emu::KernelEntry& k = *r.kernels[it->second];
    if (sizes)
        for (size_t i = 0; i < k.nparams && i < max; ++i) sizes[i] = k.param_sizes[i];
    return long(k.nparams);
}
// the parameter structs registered (every struct passed by value to a kernel), by index.
TUNA_EMU_API size_t tuna_emu_struct_count(void) { return tuna_emu::reg().struct_list.size(); }
TUNA_EMU_API const char* tuna_emu_struct_name(size_t i) {
    const auto& r = tuna_emu::reg();
    return i < r.struct_list.size() ? r.struct_list[i]->name : nullptr;
}
