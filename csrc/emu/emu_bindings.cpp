// pyllmops._C's emulator controls (only in PYLLMOPS_CUDA=emu builds; docs/emulator.md):
//   emu_config() -> dict, emu_set_config(schedule, seed, breaks, arch): the schedule and negative
//   controls; emu_guarded_buffer(nbytes): a writable buffer whose end abuts an inaccessible page (the
//   Python layer allocates kernel outputs with it); emu_selftest(name): the detectors' proofs.
#include <string>
#include <vector>

#include "bindings.h"
#include "emu/runtime.h"

namespace pyllmops {
namespace emu {
std::vector<float> run_selftest(const std::string& name);
}  // namespace emu
}  // namespace pyllmops

namespace {

namespace emu = pyllmops::emu;

struct GuardedBuffer {
  void* data;
  size_t bytes;
  explicit GuardedBuffer(size_t n) : data(emu::guarded_alloc(n)), bytes(n) {}
  ~GuardedBuffer() { emu::guarded_free(data); }
  GuardedBuffer(const GuardedBuffer&) = delete;
  GuardedBuffer& operator=(const GuardedBuffer&) = delete;
};

const char* schedule_name(emu::Schedule s) {
  switch (s) {
    case emu::Schedule::forward: return "forward";
    case emu::Schedule::reverse: return "reverse";
    case emu::Schedule::random: return "random";
  }
  return "?";
}

py::dict config_dict() {
  const emu::Config c = emu::config();
  py::dict d;
  d["schedule"] = schedule_name(c.schedule);
  d["seed"] = c.seed;
  py::list breaks;
  if (c.breaks & emu::kBreakMma) breaks.append("mma");
  if (c.breaks & emu::kBreakLdmatrix) breaks.append("ldmatrix");
  if (c.breaks & emu::kBreakBarrier) breaks.append("barrier");
  d["breaks"] = breaks;
  d["arch"] = c.arch;
  return d;
}

void set_config(const std::string& schedule, uint64_t seed, const std::vector<std::string>& breaks, int arch) {
  emu::Config c;
  c.schedule = emu::parse_schedule(schedule, "schedule");
  for (const auto& b : breaks) c.breaks |= emu::parse_break(b, "breaks");
  c.arch = emu::parse_arch(arch, "arch");
  c.seed = seed;
  emu::set_config(c);
}

}  // namespace

void register_emu(py::module_& m) {
  m.def("emu_config", &config_dict);
  m.def("emu_set_config", &set_config, py::arg("schedule"), py::arg("seed"), py::arg("breaks"), py::arg("arch"));
  py::class_<GuardedBuffer>(m, "GuardedBuffer", py::buffer_protocol())
      .def_buffer([](GuardedBuffer& b) {
        return py::buffer_info(b.data, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.bytes)}, {static_cast<py::ssize_t>(1)});
      });
  m.def("emu_guarded_buffer", [](size_t n) { return new GuardedBuffer(n); }, py::arg("nbytes"),
        py::return_value_policy::take_ownership);
  m.def("emu_selftest", &emu::run_selftest, py::arg("name"), py::call_guard<py::gil_scoped_release>());
}
