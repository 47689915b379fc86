// The emulated CUDA backend's execution model (docs/emulator.md).
//
// A launch runs its blocks on up to num_threads() OS threads ("workers"), one block at a time per
// worker. Inside a block every CUDA thread is a fiber (fiber.h) with its own stack; the worker's
// scheduler resumes ready fibers in the configured order (forward, reverse or random) and each runs
// until it reaches a barrier or a warp collective it must wait at, or exits:
//   - __syncthreads completes when every thread of the block has arrived (a thread that exited
//     never arrives: the others deadlock, as the PTX ISA's bar.sync expects every thread of the CTA);
//   - a warp collective (__syncwarp, shuffles, votes, mma, ldmatrix) completes when every lane named
//     in its mask has arrived with the same kind and mask; the last lane to arrive computes every
//     lane's result;
//   - if no fiber is ready and some are not done, the block is deadlocked: the launch fails with
//     which threads wait where and which are missing.
// Shared memory is a per-worker arena: static declarations are carved from its start, the dynamic
// region ends against an inaccessible page, and everything a block uses starts as 0xFF bytes
// (NaN as fp32, fp16 and bf16). Faults (guard pages, null pointers) inside a fiber are caught by a
// SIGSEGV/SIGBUS handler on an alternate stack and reported like every other error: as a
// RuntimeError from the launch naming the kernel, the block and the thread.
#include "emu/runtime.h"

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/check.h"
#include "common/launch.cuh"
#include "common/parallel.h"
#include "emu/fiber.h"

namespace pyllmops {
namespace emu {

thread_local ThreadState* t_current = nullptr;

namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per fiber; virtual (touched pages only)
constexpr int kMaxThreads = 1024;
constexpr size_t kStaticSmemMax = 48 * 1024;
constexpr size_t kAltStackBytes = 64 * 1024;
constexpr int kMaxWorkers = 16;  // OS threads per launch: each holds up to 1024 fiber stacks (256 MB virtual)

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}
size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

// ---- configuration ------------------------------------------------------------------------------
std::mutex g_config_mu;
bool g_config_read = false;
Config g_config;

Config read_env() {
  Config c;
  if (const char* s = std::getenv("PYLLMOPS_EMU_SCHEDULE")) c.schedule = parse_schedule(s, "PYLLMOPS_EMU_SCHEDULE");
  if (const char* s = std::getenv("PYLLMOPS_EMU_SEED")) {
    char* end = nullptr;
    c.seed = std::strtoull(s, &end, 10);
    if (*s == '\0' || *end != '\0') throw_invalid("PYLLMOPS_EMU_SEED must be a non-negative integer, got '", s, "'");
  }
  if (const char* s = std::getenv("PYLLMOPS_EMU_BREAK")) {
    const std::string v(s);
    for (size_t start = 0; start <= v.size();) {
      const size_t comma = std::min(v.find(',', start), v.size());
      if (comma > start) c.breaks |= parse_break(v.substr(start, comma - start), "PYLLMOPS_EMU_BREAK");
      start = comma + 1;
    }
  }
  if (const char* s = std::getenv("PYLLMOPS_EMU_ARCH")) c.arch = parse_arch(std::atoi(s), "PYLLMOPS_EMU_ARCH");
  return c;
}

// ---- the threads of one block ---------------------------------------------------------------
struct Copy {
  void* dst;
  const void* src;
  int size, src_size;
};

enum class FiberState { ready, waiting, done };

struct Worker;

struct Fiber {
  FiberContext ctx;
  ThreadState ts;
  FiberState state = FiberState::ready;
  Worker* worker = nullptr;
  bool at_barrier = false;
  // cp.async: copies issued but not landed; group_end[i] = copies.size() when group i was committed.
  std::vector<Copy> copies;
  std::vector<size_t> group_end;
  size_t landed = 0;  // copies[0, landed) have landed
};

struct PendingCollective {
  Collective kind;
  unsigned mask, arrived;
  CombineFn combine;
  const void* ctx;
  Site site;
  void* payloads[32];
};

struct StaticAlloc {
  const void* tag;
  size_t offset;
};

const char* collective_name(Collective k) {
  switch (k) {
    case Collective::syncwarp: return "__syncwarp";
    case Collective::shfl: return "a __shfl*_sync";
    case Collective::ballot: return "__ballot_sync";
    case Collective::vote_any: return "__any_sync";
    case Collective::vote_all: return "__all_sync";
    case Collective::mma: return "mma.sync";
    case Collective::ldmatrix: return "ldmatrix";
  }
  return "?";
}

struct KernelFault {
  std::string what;
};

struct Worker {
  // Memory, kept across launches.
  char* stacks = nullptr;  // kMaxThreads x (guard page + kStackBytes)
  char* arena = nullptr;   // static region, dynamic region, guard page
  size_t arena_bytes = 0;  // before the guard
  char* altstack = nullptr;
  std::vector<Fiber> fibers;

  // The running launch and block.
  const LaunchConfig* cfg = nullptr;
  const std::function<void()>* body = nullptr;
  FiberContext sched;
  Fiber* running = nullptr;
  int n_threads = 0, live = 0;
  char* dyn = nullptr;     // dynamic region: [dyn, arena + arena_bytes)
  char* static_base = nullptr;
  size_t static_used = 0;
  std::vector<StaticAlloc> statics;
  int barrier_arrived = 0;
  Site barrier_site{nullptr, 0};
  std::vector<std::vector<PendingCollective>> warps;
  std::mt19937_64 rng;
  std::string error;  // set on the first failure of the block

  Worker() {
    const size_t page = page_size();
    stacks = static_cast<char*>(mmap(nullptr, (page + kStackBytes) * kMaxThreads, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (stacks == MAP_FAILED) throw_runtime("pyllmops emulator: cannot map fiber stacks");
    arena_bytes = round_up(kStaticSmemMax + 232448, page);
    arena = static_cast<char*>(mmap(nullptr, arena_bytes + page, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (arena == MAP_FAILED || mprotect(arena + arena_bytes, page, PROT_NONE) != 0) {
      release();
      throw_runtime("pyllmops emulator: cannot map shared memory");
    }
    altstack = static_cast<char*>(std::malloc(kAltStackBytes));
    fibers.resize(kMaxThreads);
  }
  ~Worker() { release(); }

  void release() {
    if (stacks != nullptr && stacks != MAP_FAILED) munmap(stacks, (page_size() + kStackBytes) * kMaxThreads);
    if (arena != nullptr && arena != MAP_FAILED) munmap(arena, arena_bytes + page_size());
    std::free(altstack);
    stacks = arena = altstack = nullptr;
  }

  // Guard pages below the stacks of fibers [0, n): made on first need (each mprotect splits the mapping,
  // and a process has a limited number of mappings), so a worker holds as many as its largest block.
  void guard_stacks(int n) {
    const size_t per = page_size() + kStackBytes;
    for (; guarded_stacks < n; ++guarded_stacks)
      if (mprotect(stacks + guarded_stacks * per, page_size(), PROT_NONE) != 0)
        throw_runtime("pyllmops emulator: cannot protect a fiber stack's guard page (too many memory mappings?)");
  }
  int guarded_stacks = 0;

  bool contains_shared(const void* p, size_t bytes) const {
    const char* c = static_cast<const char*>(p);
    return c >= static_base && c + bytes <= arena + arena_bytes;
  }

  std::string where(const Fiber* f) const {
    std::ostringstream os;
    os << "block (" << f->ts.block_idx.x << "," << f->ts.block_idx.y << "," << f->ts.block_idx.z << "), thread ("
       << f->ts.thread_idx.x << "," << f->ts.thread_idx.y << "," << f->ts.thread_idx.z << ")";
    return os.str();
  }

  void fail(const std::string& what) {
    if (error.empty()) error = what;
  }

  // The running fiber stops for good (an error): back to the scheduler, never resumed.
  [[noreturn]] void abandon_running() {
    Fiber* f = running;
    f->state = FiberState::done;
    fiber_switch(&f->ctx, &sched);
    __builtin_unreachable();
  }

  // The running fiber stays ready but lets the scheduler pick who runs next.
  void yield_running() {
    Fiber* f = running;
    f->state = FiberState::ready;
    fiber_switch(&f->ctx, &sched);
  }

  // The running fiber waits (state set by the caller) until another fiber makes it ready.
  void wait_running() {
    Fiber* f = running;
    fiber_switch(&f->ctx, &sched);
  }

  void run_block(uint3 bid, int64_t linear);
  Config conf;  // the launch's configuration (read once per launch)
  size_t smem_optin = 0;  // what cudaFuncSetAttribute allowed this kernel beyond 48 KB (0: not opted in)
  std::string deadlock_report() const;
};

thread_local Worker* t_worker = nullptr;

Fiber& current_fiber() { return *t_worker->running; }

void land_copies(Fiber& f, size_t upto) {
  for (; f.landed < upto; ++f.landed) {
    const Copy& c = f.copies[f.landed];
    std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_size));
    std::memset(static_cast<char*>(c.dst) + c.src_size, 0, static_cast<size_t>(c.size - c.src_size));
  }
}

void fiber_main(void* arg) {
  auto* f = static_cast<Fiber*>(arg);
  Worker* w = f->worker;
  try {
    (*w->body)();
    land_copies(*f, f->copies.size());  // the hardware completes copies nobody waited for
  } catch (const KernelFault& e) {
    w->fail(w->where(f) + ": " + e.what);
  } catch (const std::exception& e) {
    w->fail(w->where(f) + ": " + e.what());
  } catch (...) {
    w->fail(w->where(f) + ": unknown exception");
  }
  f->state = FiberState::done;
  --w->live;
  fiber_switch(&f->ctx, &w->sched);
  __builtin_unreachable();
}

std::string ranges(const std::vector<int>& ids) {
  std::ostringstream os;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    os << (i ? "," : "") << ids[i];
    if (j > i) os << "-" << ids[j];
    i = j + 1;
  }
  return os.str();
}

std::string site_str(Site s) {
  std::string f = s.file ? s.file : "?";
  const auto pos = f.find("csrc/");
  if (pos != std::string::npos) f = f.substr(pos);
  return f + ":" + std::to_string(s.line);
}

std::string Worker::deadlock_report() const {
  std::ostringstream os;
  os << "deadlock in block (" << fibers[0].ts.block_idx.x << "," << fibers[0].ts.block_idx.y << ","
     << fibers[0].ts.block_idx.z << "):";
  std::vector<int> at_barrier, exited;
  for (int i = 0; i < n_threads; ++i) {
    if (fibers[i].state == FiberState::done) exited.push_back(i);
    else if (fibers[i].at_barrier)
      at_barrier.push_back(i);
  }
  if (barrier_arrived > 0)
    os << " threads " << ranges(at_barrier) << " wait at __syncthreads (" << site_str(barrier_site) << ");";
  for (size_t w = 0; w < warps.size(); ++w)
    for (const auto& p : warps[w]) {
      std::vector<int> waiting, missing;
      for (int l = 0; l < 32; ++l) {
        if (!(p.mask >> l & 1u)) continue;
        (p.arrived >> l & 1u ? waiting : missing).push_back(l);
      }
      os << " warp " << w << ": lanes " << ranges(waiting) << " wait at " << collective_name(p.kind) << " (mask 0x"
         << std::hex << p.mask << std::dec << ", " << site_str(p.site) << ") for lanes " << ranges(missing) << ";";
    }
  if (!exited.empty()) os << " threads " << ranges(exited) << " have exited";
  return os.str();
}

void Worker::run_block(uint3 bid, int64_t linear) {
  const dim3 bd = cfg->block;
  const Config& c = conf;
  // Each block's random order depends only on the seed, the kernel and the block: a failure replays with the
  // same PYLLMOPS_EMU_SEED whatever the number of workers or which worker took the block.
  rng.seed(std::hash<std::string>()(cfg->name) ^ (c.seed * 0x9E3779B97F4A7C15ull) ^ static_cast<uint64_t>(linear));
  // Shared memory: the dynamic region ends at the guard page; statics are carved below it.
  const size_t dyn_bytes = round_up(cfg->dynamic_smem, 16);
  dyn = arena + arena_bytes - dyn_bytes;
  static_base = dyn - kStaticSmemMax;
  static_used = 0;
  statics.clear();
  std::memset(dyn, 0xFF, dyn_bytes);
  barrier_arrived = 0;
  warps.assign(static_cast<size_t>((n_threads + 31) / 32), {});
  live = n_threads;
  guard_stacks(n_threads);
  const size_t per = page_size() + kStackBytes;
  for (int i = 0; i < n_threads; ++i) {
    Fiber& f = fibers[i];
    f.worker = this;
    f.state = FiberState::ready;
    f.at_barrier = false;
    f.copies.clear();
    f.group_end.clear();
    f.landed = 0;
    f.ts.thread_idx = {static_cast<unsigned>(i % bd.x), static_cast<unsigned>(i / bd.x % bd.y),
                       static_cast<unsigned>(i / (bd.x * bd.y))};
    f.ts.block_idx = bid;
    f.ts.block_dim = bd;
    f.ts.grid_dim = cfg->grid;
    f.ts.lane = i % 32;
    f.ts.warp = i / 32;
    fiber_init(&f.ctx, stacks + i * per + page_size(), kStackBytes, &fiber_main, &f);
  }
  std::vector<int> order(static_cast<size_t>(n_threads));
  for (int i = 0; i < n_threads; ++i) order[i] = c.schedule == Schedule::reverse ? n_threads - 1 - i : i;
  while (live > 0 && error.empty()) {
    if (c.schedule == Schedule::random) std::shuffle(order.begin(), order.end(), rng);
    bool progressed = false;
    for (int i : order) {
      Fiber& f = fibers[i];
      if (f.state != FiberState::ready) continue;
      running = &f;
      t_current = &f.ts;
      fiber_switch(&sched, &f.ctx);
      running = nullptr;
      t_current = nullptr;
      progressed = true;
      if (!error.empty()) break;
    }
    if (!progressed && live > 0 && error.empty()) fail(deadlock_report());
  }
}

// ---- launches -------------------------------------------------------------------------------
std::mutex g_pool_mu;
std::vector<std::unique_ptr<Worker>> g_pool;

std::unique_ptr<Worker> take_worker() {
  {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    if (!g_pool.empty()) {
      auto w = std::move(g_pool.back());
      g_pool.pop_back();
      return w;
    }
  }
  return std::make_unique<Worker>();
}
void give_worker(std::unique_ptr<Worker> w) {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  g_pool.push_back(std::move(w));
}

std::mutex g_attr_mu;
std::map<const void*, int> g_max_dynamic_smem;

struct sigaction g_prev_segv, g_prev_bus;
std::once_flag g_signals_once;

struct Guarded {
  char* map;     // the mapping: data, alignment slack, guard page
  size_t span;   // its size
  size_t bytes;  // the buffer's own size
};
std::mutex g_guarded_mu;
std::map<void*, Guarded> g_guarded;  // by data pointer
constexpr unsigned char kCanary = 0xC5;

// A write into the up-to-15-byte alignment slack between a guarded buffer's end and its guard page does
// not fault: the slack holds a canary, checked (and restored) after every launch.
void check_canaries(const char* kernel) {
  std::lock_guard<std::mutex> lock(g_guarded_mu);
  for (auto& [data, g] : g_guarded) {
    unsigned char* end = static_cast<unsigned char*>(data) + g.bytes;
    const size_t slack = static_cast<size_t>(g.map + g.span - page_size() - reinterpret_cast<char*>(end));
    for (size_t i = 0; i < slack; ++i)
      if (end[i] != kCanary) {
        std::memset(end, kCanary, slack);
        throw_runtime("pyllmops emulator: kernel ", kernel, " wrote ", i, " bytes past the end of a ", g.bytes,
                      "-byte kernel output (inside its alignment slack)");
      }
  }
}

// Names the guarded buffer whose guard page holds `addr`. Called from the fault handler on a fault
// raised synchronously by kernel code, which never holds g_guarded_mu (try_lock, to be sure).
bool describe_guarded(const char* addr, std::ostringstream& os) {
  std::unique_lock<std::mutex> lock(g_guarded_mu, std::try_to_lock);
  if (!lock.owns_lock()) return false;
  for (const auto& [data, g] : g_guarded) {
    const char* guard = g.map + g.span - page_size();
    if (addr >= guard && addr < guard + page_size()) {
      const char* end = static_cast<const char*>(data) + g.bytes;
      os << " (" << addr - end << " bytes past the end of a " << g.bytes << "-byte kernel output)";
      return true;
    }
  }
  return false;
}

void on_fault(int sig, siginfo_t* info, void* uctx) {
  Worker* w = t_worker;
  if (w == nullptr || w->running == nullptr) {
    // Not ours: hand the signal to whoever had it before.
    const struct sigaction& prev = sig == SIGSEGV ? g_prev_segv : g_prev_bus;
    if (prev.sa_flags & SA_SIGINFO) {
      if (prev.sa_sigaction) prev.sa_sigaction(sig, info, uctx);
      return;
    }
    if (prev.sa_handler == SIG_IGN) return;
    if (prev.sa_handler == SIG_DFL) {
      signal(sig, SIG_DFL);
      return;  // the faulting instruction runs again and takes the default action
    }
    prev.sa_handler(sig);
    return;
  }
  const char* addr = static_cast<const char*>(info->si_addr);
  bool write = false;
#if defined(__x86_64__)
  write = (static_cast<ucontext_t*>(uctx)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#endif
  std::ostringstream os;
  os << "invalid " << (write ? "write" : "access") << " at address " << static_cast<const void*>(addr);
  const char* shared_end = w->arena + w->arena_bytes;
  if (addr >= shared_end && addr < shared_end + page_size())
    os << " (" << addr - shared_end << " bytes past the end of the dynamic shared memory)";
  else if (addr < reinterpret_cast<const char*>(page_size()))
    os << " (a null pointer)";
  else if (!describe_guarded(addr, os))
    os << " (outside every buffer the emulator knows: e.g. past the end of an input, or a fiber stack overflow)";
  w->fail(w->where(w->running) + ": " + os.str());
  w->abandon_running();
}

void install_signal_handlers() {
  std::call_once(g_signals_once, [] {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = &on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_prev_segv);
    sigaction(SIGBUS, &sa, &g_prev_bus);
  });
}

std::string dims(dim3 d) {
  return std::to_string(d.x) + "x" + std::to_string(d.y) + "x" + std::to_string(d.z);
}

void check_launch(const LaunchConfig& cfg) {
  const auto fail = [&](const std::string& what) {
    throw_runtime("pyllmops emulator: launching ", cfg.name, " (grid ", dims(cfg.grid), ", block ", dims(cfg.block),
                  ", ", cfg.dynamic_smem, " B dynamic shared memory) failed: ", what);
  };
  const dim3 g = cfg.grid, b = cfg.block;
  if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0)
    fail("invalid configuration argument (a zero grid or block dimension)");
  if (b.x > 1024 || b.y > 1024 || b.z > 64 || static_cast<uint64_t>(b.x) * b.y * b.z > 1024)
    fail("invalid configuration argument (at most 1024 threads per block; x, y <= 1024, z <= 64)");
  if (g.x > 2147483647u || g.y > 65535 || g.z > 65535)
    fail("invalid configuration argument (grid x <= 2^31 - 1, y and z <= 65535)");
  if (cfg.dynamic_smem > max_shared_optin())
    fail("too many resources requested for launch (more than " + std::to_string(max_shared_optin()) +
         " B of shared memory per block on sm_" + std::to_string(config().arch) + ")");
  if (cfg.dynamic_smem > 48 * 1024) {
    int allowed = 0;
    {
      std::lock_guard<std::mutex> lock(g_attr_mu);
      auto it = g_max_dynamic_smem.find(cfg.kernel);
      if (it != g_max_dynamic_smem.end()) allowed = it->second;
    }
    if (cfg.dynamic_smem > static_cast<size_t>(allowed))
      fail("too many resources requested for launch (dynamic shared memory above 48 KB needs "
           "cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) first; set: " +
           std::to_string(allowed) + " B)");
  }
}

}  // namespace

// ---- public entry points ----------------------------------------------------------------------
Schedule parse_schedule(const std::string& v, const char* name) {
  if (v == "forward") return Schedule::forward;
  if (v == "reverse") return Schedule::reverse;
  if (v == "random") return Schedule::random;
  throw_invalid(name, " must be 'forward', 'reverse' or 'random', got '", v, "'");
}

unsigned parse_break(const std::string& v, const char* name) {
  if (v == "mma") return kBreakMma;
  if (v == "ldmatrix") return kBreakLdmatrix;
  if (v == "barrier") return kBreakBarrier;
  throw_invalid(name, ": each entry must be 'mma', 'ldmatrix' or 'barrier', got '", v, "'");
}

int parse_arch(int arch, const char* name) {
  if (arch != 80 && arch != 90) throw_invalid(name, " must be 80 or 90, got ", arch);
  return arch;
}

Config config() {
  std::lock_guard<std::mutex> lock(g_config_mu);
  if (!g_config_read) {
    g_config = read_env();
    g_config_read = true;
  }
  return g_config;
}

void set_config(const Config& c) {
  std::lock_guard<std::mutex> lock(g_config_mu);
  g_config = c;
  g_config_read = true;
}

unsigned broken() { return t_worker != nullptr ? t_worker->conf.breaks : config().breaks; }

size_t max_shared_optin() { return config().arch == 80 ? 166912 : 232448; }  // 163 KB / 227 KB

void run_grid(const LaunchConfig& cfg, const std::function<void()>& body) {
  check_launch(cfg);
  install_signal_handlers();
  const Config c = config();
  const dim3 g = cfg.grid;
  const int64_t n_blocks = static_cast<int64_t>(g.x) * g.y * g.z;
  std::vector<int64_t> order(static_cast<size_t>(n_blocks));
  for (int64_t i = 0; i < n_blocks; ++i) order[i] = c.schedule == Schedule::reverse ? n_blocks - 1 - i : i;
  std::mt19937_64 rng(c.seed);
  if (c.schedule == Schedule::random) std::shuffle(order.begin(), order.end(), rng);

  size_t optin = 0;  // a kernel that opted in may take static + dynamic up to the per-block maximum
  {
    std::lock_guard<std::mutex> lock(g_attr_mu);
    auto it = g_max_dynamic_smem.find(cfg.kernel);
    if (it != g_max_dynamic_smem.end() && it->second > 48 * 1024) optin = max_shared_optin();
  }
  const int n_workers = static_cast<int>(std::min<int64_t>(std::min(std::max(1, num_threads()), kMaxWorkers), n_blocks));
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex err_mu;
  std::string first_error;
  const int threads = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);

  auto work = [&]() {
    std::unique_ptr<Worker> w;
    try {
      w = take_worker();
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(err_mu);
      if (first_error.empty()) first_error = e.what();
      failed = true;
      return;
    }
    stack_t ss{}, old_ss{};
    ss.ss_sp = w->altstack;
    ss.ss_size = kAltStackBytes;
    sigaltstack(&ss, &old_ss);
    t_worker = w.get();
    w->cfg = &cfg;
    w->body = &body;
    w->n_threads = threads;
    w->conf = c;
    w->smem_optin = optin;
    for (int64_t i; !failed && (i = next.fetch_add(1)) < n_blocks;) {
      const int64_t lin = order[i];
      const uint3 bid{static_cast<unsigned>(lin % g.x), static_cast<unsigned>(lin / g.x % g.y),
                      static_cast<unsigned>(lin / (static_cast<int64_t>(g.x) * g.y))};
      w->error.clear();
      w->run_block(bid, lin);
      if (!w->error.empty()) {
        std::lock_guard<std::mutex> lock(err_mu);
        if (first_error.empty()) first_error = w->error;
        failed = true;
      }
    }
    t_worker = nullptr;
    sigaltstack(&old_ss, nullptr);
    give_worker(std::move(w));
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < n_workers; ++i) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (failed)
    throw_runtime("pyllmops emulator: kernel ", cfg.name, " (grid ", dims(cfg.grid), ", block ", dims(cfg.block),
                  "): ", first_error);
  check_canaries(cfg.name);
}

void kernel_error(const char* what, Site site) {
  throw KernelFault{std::string(what) + " (" + site_str(site) + ")"};
}

void sync_block(Site site) {
  Worker* w = t_worker;
  if (w->conf.breaks & kBreakBarrier) return;  // negative control: a barrier that does nothing
  Fiber& f = *w->running;
  if (w->barrier_arrived == 0) w->barrier_site = site;
  ++w->barrier_arrived;
  if (w->barrier_arrived == w->n_threads) {
    w->barrier_arrived = 0;
    for (int i = 0; i < w->n_threads; ++i)
      if (w->fibers[i].at_barrier) {
        w->fibers[i].state = FiberState::ready;
        w->fibers[i].at_barrier = false;
      }
    w->yield_running();  // who runs first after the barrier is the schedule's choice, not the last arriver's
    return;
  }
  f.state = FiberState::waiting;
  f.at_barrier = true;
  w->wait_running();
}

void warp_collective(Collective kind, unsigned mask, void* payload, CombineFn combine, const void* ctx, Site site) {
  Worker* w = t_worker;
  Fiber& f = *w->running;
  const int lane = f.ts.lane, warp = f.ts.warp;
  const auto error = [&](const std::string& what) {
    throw KernelFault{std::string(collective_name(kind)) + " (" + site_str(site) + "): " + what};
  };
  if (!(mask >> lane & 1u)) {
    std::ostringstream os;
    os << "lane " << lane << " is not in its mask 0x" << std::hex << mask;
    error(os.str());
  }
  const int first = warp * 32, n_lanes = std::min(32, w->n_threads - first);
  if (n_lanes < 32 && (mask >> n_lanes) != 0u) {
    std::ostringstream os;
    os << "mask 0x" << std::hex << mask << " names lanes that do not exist (the block's last warp has " << std::dec
       << n_lanes << " lanes)";
    error(os.str());
  }
  auto& pend = w->warps[static_cast<size_t>(warp)];
  PendingCollective* p = nullptr;
  for (auto& q : pend) {
    if ((q.mask & mask) == 0u) continue;
    if (q.mask != mask || q.kind != kind) {
      std::ostringstream os;
      os << "lane " << lane << " calls it with mask 0x" << std::hex << mask << " while lanes 0x" << q.arrived
         << " wait at " << collective_name(q.kind) << " with mask 0x" << q.mask << std::dec << " (" << site_str(q.site)
         << ")";
      error(os.str());
    }
    p = &q;
  }
  if (p == nullptr) {
    pend.push_back(PendingCollective{kind, mask, 0u, combine, ctx, site, {}});
    p = &pend.back();
  }
  p->payloads[lane] = payload;
  p->arrived |= 1u << lane;
  if (p->arrived == mask) {
    const PendingCollective done = *p;
    pend.erase(pend.begin() + (p - pend.data()));
    if (done.combine) done.combine(done.payloads, done.mask, done.ctx);
    for (int l = 0; l < 32; ++l)
      if ((done.mask >> l & 1u) && l != lane) {
        Fiber& o = w->fibers[first + l];
        o.state = FiberState::ready;
      }
    w->yield_running();
    return;
  }
  f.state = FiberState::waiting;
  w->wait_running();
}

void shfl_combine(void* const* payloads, unsigned mask, const void* /*ctx*/) {
  const ShflPayload* first = nullptr;
  for (int l = 0; l < 32 && first == nullptr; ++l)
    if (mask >> l & 1u) first = static_cast<const ShflPayload*>(payloads[l]);
  const int width = first->width;
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    throw KernelFault{"__shfl*_sync: width must be a power of two in [1, 32], got " + std::to_string(width)};
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    auto* p = static_cast<ShflPayload*>(payloads[l]);
    if (p->mode != first->mode || p->width != width)
      throw KernelFault{"__shfl*_sync: the lanes of one shuffle use different variants or widths"};
    // PTX shfl.sync: the lane operand's low 5 bits; clamped to the lane's width-segment.
    const int base = l & ~(width - 1), arg = p->arg & 31;
    int src = l;
    switch (p->mode) {
      case ShflMode::idx: src = base + (arg & (width - 1)); break;
      case ShflMode::up: src = l - arg >= base ? l - arg : l; break;
      case ShflMode::down: src = l + arg < base + width ? l + arg : l; break;
      case ShflMode::bfly: src = (l ^ arg) < base + width ? l ^ arg : l; break;
    }
    if (!(mask >> src & 1u)) {
      std::ostringstream os;
      os << "lane " << l << " reads lane " << src << ", which is not in the mask 0x" << std::hex << mask;
      throw KernelFault{std::string("__shfl*_sync: ") + os.str()};
    }
    p->out = static_cast<ShflPayload*>(payloads[src])->in;
  }
}

void vote_combine(void* const* payloads, unsigned mask, const void* ctx) {
  const auto kind = *static_cast<const Collective*>(ctx);
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && static_cast<VotePayload*>(payloads[l])->pred) ballot |= 1u << l;
  const unsigned out = kind == Collective::ballot     ? ballot
                       : kind == Collective::vote_any ? static_cast<unsigned>(ballot != 0u)
                                                      : static_cast<unsigned>(ballot == mask);
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) static_cast<VotePayload*>(payloads[l])->out = out;
}

unsigned vote(Collective kind, unsigned mask, int pred, Site site) {
  VotePayload p{pred != 0, 0u};
  warp_collective(kind, mask, &p, &vote_combine, &kind, site);
  return p.out;
}

void* shared_static(const void* tag, size_t bytes, size_t align, const char* name, Site site) {
  Worker* w = t_worker;
  for (const auto& s : w->statics)
    if (s.tag == tag) return w->static_base + s.offset;
  const size_t off = round_up(w->static_used, align);
  if (off + bytes > kStaticSmemMax)
    throw KernelFault{std::string("static shared memory ") + name + " (" + site_str(site) + ") takes the block's "
                      "static shared memory past 48 KB"};
  if (off + bytes + w->cfg->dynamic_smem > 48 * 1024 && w->smem_optin < off + bytes + w->cfg->dynamic_smem)
    throw KernelFault{std::string("static shared memory ") + name + " (" + site_str(site) + ") plus " +
                      std::to_string(w->cfg->dynamic_smem) + " B dynamic exceed 48 KB per block, and the kernel "
                      "has not opted in (cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize))"};
  if (off + bytes + round_up(w->cfg->dynamic_smem, 16) > max_shared_optin())
    throw KernelFault{std::string("static shared memory ") + name + " (" + site_str(site) + ") plus " +
                      std::to_string(w->cfg->dynamic_smem) + " B dynamic exceed the " +
                      std::to_string(max_shared_optin()) + " B per block of sm_" + std::to_string(config().arch)};
  w->statics.push_back({tag, off});
  w->static_used = off + bytes;
  std::memset(w->static_base + off, 0xFF, bytes);
  return w->static_base + off;
}

void* shared_dynamic() { return t_worker->dyn; }

bool in_shared(const void* p, size_t bytes) { return t_worker->contains_shared(p, bytes); }

// ---- cp.async (ptx.cpp's entry points live here: they need the fiber) --------------------------
void cp_async(int cp_size, bool cache_global, void* dst, const void* src, int src_size, Site site) {
  (void)cache_global;  // .ca / .cg differ only in caching
  if (src_size < 0 || src_size > cp_size) kernel_error("cp.async: src-size outside [0, cp-size]", site);
  if (!in_shared(dst, static_cast<size_t>(cp_size))) kernel_error("cp.async: the destination is not in shared memory", site);
  if (reinterpret_cast<uintptr_t>(dst) % static_cast<uintptr_t>(cp_size) != 0 ||
      reinterpret_cast<uintptr_t>(src) % static_cast<uintptr_t>(cp_size) != 0)
    kernel_error("cp.async: source and destination must be aligned to cp-size", site);
  Fiber& f = current_fiber();
  // Until its wait, the destination holds poison: a read before the wait sees NaN.
  std::memset(dst, 0xFF, static_cast<size_t>(cp_size));
  f.copies.push_back({dst, src, cp_size, src_size});
}

void cp_async_commit() {
  Fiber& f = current_fiber();
  f.group_end.push_back(f.copies.size());
}

void cp_async_wait(int n, Site site) {
  (void)site;
  Fiber& f = current_fiber();
  const size_t groups = f.group_end.size();
  if (groups > static_cast<size_t>(n)) land_copies(f, f.group_end[groups - 1 - static_cast<size_t>(n)]);
}

void* guarded_alloc(size_t bytes) {
  const size_t page = page_size();
  const size_t used = round_up(std::max<size_t>(bytes, 1), 16);  // the data stays 16-byte aligned
  const size_t span = round_up(used, page) + page;
  char* base = static_cast<char*>(mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED) throw_runtime("pyllmops emulator: cannot map a guarded buffer of ", bytes, " bytes");
  char* guard = base + span - page;
  if (mprotect(guard, page, PROT_NONE) != 0) {
    munmap(base, span);
    throw_runtime("pyllmops emulator: cannot protect the guard page of a ", bytes, "-byte buffer");
  }
  char* data = guard - used;
  std::memset(data + bytes, kCanary, used - bytes);  // the alignment slack: checked after every launch
  std::lock_guard<std::mutex> lock(g_guarded_mu);
  g_guarded[data] = Guarded{base, span, bytes};
  return data;
}

void guarded_free(void* data) {
  std::lock_guard<std::mutex> lock(g_guarded_mu);
  auto it = g_guarded.find(data);
  if (it == g_guarded.end()) return;
  munmap(it->second.map, it->second.span);
  g_guarded.erase(it);
}

}  // namespace emu
}  // namespace pyllmops

// ---- misaligned accesses -------------------------------------------------------------------------
// The emulated kernels are compiled with -fsanitize=alignment: every access through a typed pointer
// (a uint4 vector load, a float2 store) checks the type's alignment and calls this on a violation,
// as the hardware would fault with a misaligned address.
extern "C" {
struct UbsanSourceLocation {
  const char* file;
  uint32_t line, column;
};
struct UbsanTypeDescriptor {
  uint16_t kind, info;
  char name[1];
};
struct UbsanTypeMismatchData {
  UbsanSourceLocation loc;
  const UbsanTypeDescriptor* type;
  unsigned char log_alignment;
  unsigned char type_check_kind;
};
[[noreturn]] void __ubsan_handle_type_mismatch_v1(UbsanTypeMismatchData* d, uintptr_t ptr) {
  std::ostringstream os;
  if (ptr == 0)
    os << "null pointer access";
  else
    os << "misaligned access: address 0x" << std::hex << ptr << std::dec << " of type " << d->type->name << " needs "
       << (1u << d->log_alignment) << "-byte alignment";
  const pyllmops::emu::Site site{d->loc.file, static_cast<int>(d->loc.line)};
  if (pyllmops::emu::t_worker != nullptr && pyllmops::emu::t_worker->running != nullptr)
    pyllmops::emu::kernel_error(os.str().c_str(), site);
  pyllmops::throw_runtime("pyllmops emulator: ", os.str(), " (", pyllmops::emu::site_str(site), ")");
}
[[noreturn]] void __ubsan_handle_type_mismatch_v1_abort(UbsanTypeMismatchData* d, uintptr_t ptr) {
  __ubsan_handle_type_mismatch_v1(d, ptr);
}
}  // extern "C"

// ---- the CUDA runtime API the kernels' host code calls ------------------------------------------
namespace {
thread_local cudaError_t t_last_error = cudaSuccess;
}

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return t_last_error; }
const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return "emulated CUDA error";
  }
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : (t_last_error = cudaErrorInvalidDevice); }
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device != 0) return t_last_error = cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(pyllmops::emu::max_shared_optin()); break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrMultiProcessorCount: *value = pyllmops::emu::config().arch == 80 ? 108 : 132; break;
    case cudaDevAttrComputeCapabilityMajor: *value = pyllmops::emu::config().arch / 10; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    default: return t_last_error = cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
// Stream-ordered allocation (the attention backward's dQ workspace): a guarded buffer (an access past its end
// faults), filled with 0xFF bytes (NaN) so that a read of a never-written element shows in the results.
cudaError_t cudaMallocAsync(void** ptr, size_t size, cudaStream_t) {
  void* p = pyllmops::emu::guarded_alloc(size);
  std::memset(p, 0xFF, size);
  *ptr = p;
  return cudaSuccess;
}
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t) {
  pyllmops::emu::guarded_free(ptr);
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return t_last_error = cudaErrorInvalidValue;
  if (value < 0 || static_cast<size_t>(value) > pyllmops::emu::max_shared_optin())
    return t_last_error = cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(pyllmops::emu::g_attr_mu);
  pyllmops::emu::g_max_dynamic_smem[func] = value;
  return cudaSuccess;
}

}  // extern "C"
