#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <thread>

#include "asteria/cuda.h"
#include "asteria/host_memory.h"
#include "asteria/scheduler.h"
#include "convert.h"

namespace py = pybind11;
using asteria::JobKind;
using asteria::JobSpec;
using asteria::RefreshScheduler;
using asteria_py::square_from_numpy;
using asteria_py::to_numpy;

namespace {

py::dict result_outputs(const asteria::JobResult& r) {
  py::dict d;
  for (const auto& [name, t] : r.outputs) d[py::str(name)] = to_numpy(t);
  return d;
}

#define REUSE_DOC                                                                                            \
  "reuse_inputs: write the n×n results over the job's inputs (basis/eigenvectors/root over a, rotation over q), "   \
  "so the outputs share the inputs' memory (JobResult.reused_bytes); the arrays passed in must not be read "    \
  "after submitting (a shadow snapshot's views)."

using CopyPtr = std::shared_ptr<asteria::DeferredCopy>;
using QueuePtr = std::shared_ptr<asteria::CopyQueue>;

#define COPY_DOC                                                                                            \
  "copy: a DeferredCopy filling the input leases, made by the worker before the job unless made already; "  \
  "copies: a CopyQueue the worker drains first (the deferred copies of other jobs' snapshots)."

JobSpec base_spec(JobKind kind, std::uint64_t block_id, std::int64_t version, std::int64_t deadline,
                  std::uintptr_t wait_event, CopyPtr copy, QueuePtr copies) {
  JobSpec s;
  s.kind = kind;
  s.block_id = block_id;
  s.version = version;
  s.deadline = deadline;
  if (wait_event != 0) {
    // The inputs are filled by an asynchronous device-to-host copy: the worker waits for its CUDA event
    // (the training thread never does). The caller keeps the event alive until the job completes.
    ASTERIA_CHECK(asteria::cuda::built_with_cuda(), kUnavailable,
                  "[RefreshScheduler] wait_event needs asteria built with -DASTERIA_ENABLE_CUDA=ON");
    ASTERIA_CHECK(copy == nullptr, kInvalidArgument,
                  "[RefreshScheduler] a job's inputs come from a CUDA copy (wait_event) or a deferred copy, not both");
    s.prerequisite = [wait_event] { asteria::cuda::event_synchronize(wait_event); };
  } else if (copy != nullptr || copies != nullptr) {
    // The inputs are leases filled by a deferred snapshot copy: the worker makes every queued copy (those of
    // the snapshots taken since), then its own (unless made: run() waits for one another thread is making).
    s.prerequisite = [copy, copies] {
      if (copies) copies->drain();
      if (copy) copy->run();
    };
  }
  return s;
}

asteria::SchedulerFault parse_fault(const std::string& kind, const std::string& job, std::uint64_t skip,
                                    std::uint64_t count) {
  asteria::SchedulerFault f;
  using K = asteria::SchedulerFaultKind;
  if (kind == "none") f.kind = K::kNone;
  else if (kind == "solver") f.kind = K::kSolverFailure;
  else if (kind == "exception") f.kind = K::kRuntimeError;
  else if (kind == "bad_alloc") f.kind = K::kBadAlloc;
  else if (kind == "nonfinite") f.kind = K::kNonFiniteResult;
  else
    ASTERIA_CHECK(false, kInvalidArgument,
                  "[RefreshScheduler] test fault kind must be 'none', 'solver', 'exception', 'bad_alloc' or "
                  "'nonfinite', got '" << kind << "'");
  if (job == "eigh") f.job = JobKind::kEigh;
  else if (job == "inverse_root") f.job = JobKind::kInverseRoot;
  else if (job == "eigenbasis_refresh") f.job = JobKind::kEigenbasisRefresh;
  else if (job == "task") f.job = JobKind::kTask;
  else
    ASTERIA_CHECK(job == "any", kInvalidArgument,
                  "[RefreshScheduler] test fault job must be 'any', 'eigh', 'inverse_root', 'eigenbasis_refresh' or "
                  "'task', got '" << job << "'");
  f.skip = skip;
  f.count = count;
  return f;
}

constexpr const char* kFaultDoc =
    "TEST HOOK (SchedulerOptions::test_fault), never for production: after `skip` matching jobs (`job`: 'any' or "
    "one kind) ran normally, the next `count` fail: 'solver' (a LAPACK-style numerical failure), 'exception' "
    "(the job body throws std::runtime_error), 'bad_alloc' (it throws std::bad_alloc), 'nonfinite' (a NaN is "
    "written into the first output, which the worker's output check rejects); 'none' disarms. Each such job "
    "completes as failed with a message naming its block and version; the workers keep serving later jobs.";

}  // namespace

void init_scheduler(py::module_& m) {
  py::class_<asteria::JobResult>(m, "JobResult", "The outcome of one refresh job.")
      .def_readonly("job_id", &asteria::JobResult::id)
      .def_readonly("block_id", &asteria::JobResult::block_id)
      .def_readonly("version", &asteria::JobResult::version)
      .def_readonly("deadline", &asteria::JobResult::deadline)
      .def_property_readonly("ok", [](const asteria::JobResult& r) { return r.status == asteria::JobStatus::kOk; })
      .def_property_readonly("status", [](const asteria::JobResult& r) { return asteria::job_status_name(r.status); })
      .def_readonly("message", &asteria::JobResult::message)
      .def_property_readonly("outputs", &result_outputs)
      .def_readonly("reused_bytes", &asteria::JobResult::reused_bytes,
                    "Bytes of the outputs written over the job's own inputs (reuse_inputs=True).")
      .def_readonly("queued_s", &asteria::JobResult::queued_seconds)
      .def_readonly("run_s", &asteria::JobResult::run_seconds)
      .def_property_readonly("latency_s", [](const asteria::JobResult& r) { return r.queued_seconds + r.run_seconds; })
      .def("__repr__", [](const asteria::JobResult& r) {
        return "<JobResult id=" + std::to_string(r.id) + " block=" + std::to_string(r.block_id) +
               " version=" + std::to_string(r.version) + " status=" + asteria::job_status_name(r.status) + ">";
      });

  py::class_<RefreshScheduler>(m, "RefreshScheduler",
                               "Worker threads running refresh jobs earliest-deadline-first (see asteria/scheduler.h).")
      .def(py::init([](int workers, std::size_t queue_capacity, int blas_threads, bool flush_denormals,
                       double test_delay_s, double test_jitter_s, std::uint64_t test_seed, const std::string& test_fault,
                       const std::string& test_fault_job, std::uint64_t test_fault_skip,
                       std::uint64_t test_fault_count, std::vector<int> cpus) {
             asteria::SchedulerOptions o;
             o.workers = workers;
             o.cpus = std::move(cpus);
             o.queue_capacity = queue_capacity;
             o.blas_threads = blas_threads;
             o.flush_denormals = flush_denormals;
             o.test_delay_seconds = test_delay_s;
             o.test_jitter_seconds = test_jitter_s;
             o.test_seed = test_seed;
             o.test_fault = parse_fault(test_fault, test_fault_job, test_fault_skip, test_fault_count);
             return std::make_unique<RefreshScheduler>(o);
           }),
           py::kw_only(), py::arg("workers") = 1, py::arg("queue_capacity") = 4096, py::arg("blas_threads") = 1,
           py::arg("flush_denormals") = true, py::arg("test_delay_s") = 0.0, py::arg("test_jitter_s") = 0.0,
           py::arg("test_seed") = 0, py::arg("test_fault") = "none", py::arg("test_fault_job") = "any",
           py::arg("test_fault_skip") = 0, py::arg("test_fault_count") = 1, py::arg("cpus") = std::vector<int>{},
           "queue_capacity: jobs submitted and not yet collected by poll()/wait() (the job table, rounded up to a "
           "power of two); job n takes the slot of job n - queue_capacity, so submitting raises MemoryError while "
           "that job is uncollected.\n"
           "cpus: CPU numbers the workers are pinned to (empty: inherit the caller's affinity).\n"
           "test_delay_s / test_jitter_s / test_seed: TEST HOOK (SchedulerOptions::test_delay_seconds): each job "
           "first waits test_delay_s plus a uniform random extra in [0, test_jitter_s]; shutdown interrupts it.\n"
           "test_fault / test_fault_job / test_fault_skip / test_fault_count: TEST HOOK, see set_test_fault.")
      .def(
          "set_test_fault",
          [](RefreshScheduler& s, const std::string& kind, const std::string& job, std::uint64_t skip,
             std::uint64_t count) { s.set_test_fault(parse_fault(kind, job, skip, count)); },
          py::arg("kind"), py::kw_only(), py::arg("job") = "any", py::arg("skip") = 0, py::arg("count") = 1, kFaultDoc)
      .def(
          "submit_eigh",
          [](RefreshScheduler& s, std::uint64_t block_id, std::int64_t version, std::int64_t deadline,
             const py::array& a, double ridge, bool descending, std::uintptr_t wait_event, CopyPtr copy, QueuePtr copies,
             bool reuse_inputs) {
            auto spec = base_spec(JobKind::kEigh, block_id, version, deadline, wait_event, std::move(copy), std::move(copies));
            spec.reuse_inputs = reuse_inputs;
            spec.inputs.push_back(square_from_numpy(a, "RefreshScheduler.submit_eigh"));
            spec.eigh.ridge = ridge;
            spec.eigh.descending = descending;
            return s.submit(std::move(spec));
          },
          py::arg("block_id"), py::arg("version"), py::arg("deadline"), py::arg("a"), py::kw_only(),
          py::arg("ridge") = 0.0, py::arg("descending") = false, py::arg("wait_event") = 0, py::arg("copy") = nullptr, py::arg("copies") = nullptr,
          py::arg("reuse_inputs") = false,
          "Queue a symmetric eigendecomposition; outputs 'eigenvalues' and 'eigenvectors' (in columns). " COPY_DOC
          " " REUSE_DOC)
      .def(
          "submit_inverse_root",
          [](RefreshScheduler& s, std::uint64_t block_id, std::int64_t version, std::int64_t deadline,
             const py::array& a, double root, double epsilon, const std::string& method, int max_iterations,
             double tolerance, std::uintptr_t wait_event, CopyPtr copy, QueuePtr copies, bool reuse_inputs) {
            auto spec = base_spec(JobKind::kInverseRoot, block_id, version, deadline, wait_event, std::move(copy), std::move(copies));
            spec.reuse_inputs = reuse_inputs;
            spec.inputs.push_back(square_from_numpy(a, "RefreshScheduler.submit_inverse_root"));
            spec.root = root;
            spec.epsilon = epsilon;
            ASTERIA_CHECK(method == "eigh" || method == "newton", kInvalidArgument,
                          "[RefreshScheduler.submit_inverse_root] method must be 'eigh' or 'newton', got '" << method
                                                                                                     << "'");
            spec.use_newton = method == "newton";
            spec.newton.max_iterations = max_iterations;
            spec.newton.tolerance = tolerance;
            return s.submit(std::move(spec));
          },
          py::arg("block_id"), py::arg("version"), py::arg("deadline"), py::arg("a"), py::kw_only(), py::arg("root"),
          py::arg("epsilon"), py::arg("method") = "eigh", py::arg("max_iterations") = 100,
          py::arg("tolerance") = 1e-6, py::arg("wait_event") = 0, py::arg("copy") = nullptr, py::arg("copies") = nullptr,
          py::arg("reuse_inputs") = false, "Queue X = (A + eps·I)^(-1/root); output 'root'. " COPY_DOC " " REUSE_DOC)
      .def(
          "submit_eigenbasis_refresh",
          [](RefreshScheduler& s, std::uint64_t block_id, std::int64_t version, std::int64_t deadline,
             const py::array& a, const py::array& q, bool sort, bool rotation, std::uintptr_t wait_event,
             CopyPtr copy, QueuePtr copies, bool reuse_inputs) {
            auto spec = base_spec(JobKind::kEigenbasisRefresh, block_id, version, deadline, wait_event, std::move(copy), std::move(copies));
            spec.reuse_inputs = reuse_inputs;
            spec.inputs.push_back(square_from_numpy(a, "RefreshScheduler.submit_eigenbasis_refresh"));
            spec.inputs.push_back(square_from_numpy(q, "RefreshScheduler.submit_eigenbasis_refresh"));
            spec.sort = sort;
            spec.rotation = rotation;
            return s.submit(std::move(spec));
          },
          py::arg("block_id"), py::arg("version"), py::arg("deadline"), py::arg("a"), py::arg("q"), py::kw_only(),
          py::arg("sort") = true, py::arg("rotation") = true, py::arg("wait_event") = 0, py::arg("copy") = nullptr, py::arg("copies") = nullptr,
          py::arg("reuse_inputs") = false,
          "Queue a SOAP (sort=True) or KL (sort=False) eigenbasis refresh; outputs 'basis', 'permutation' and, "
          "with rotation=True, 'rotation' = qᵀ·basis. " COPY_DOC " " REUSE_DOC)
      .def(
          "submit_sleep",
          [](RefreshScheduler& s, std::uint64_t block_id, std::int64_t version, std::int64_t deadline,
             double seconds) {
            auto spec = base_spec(JobKind::kTask, block_id, version, deadline, 0, nullptr, nullptr);
            spec.task = [seconds] { std::this_thread::sleep_for(std::chrono::duration<double>(seconds)); };
            return s.submit(std::move(spec));
          },
          py::arg("block_id"), py::arg("version"), py::arg("deadline"), py::arg("seconds"),
          "Queue a job that only sleeps (for tests of ordering, cancellation and overlap).")
      .def("poll", &RefreshScheduler::poll, "Completed jobs not yet collected (never blocks).")
      .def("wait", &RefreshScheduler::wait, py::arg("job_id"), py::call_guard<py::gil_scoped_release>(),
           "Block until the job completes (the GIL is released) and return its JobResult.")
      .def("cancel", &RefreshScheduler::cancel, py::arg("job_id"), "Cancel a job that has not started.")
      .def("stats", [](const RefreshScheduler& s) {
        auto st = s.stats();
        py::dict d;
        d["submitted"] = st.submitted;
        d["completed"] = st.completed;
        d["failed"] = st.failed;
        d["cancelled"] = st.cancelled;
        d["faults_injected"] = st.faults_injected;
        d["queued"] = st.queued;
        d["running"] = st.running;
        d["uncollected"] = st.uncollected;
        d["worker_busy_s"] = st.worker_busy_seconds;
        d["max_run_s"] = st.max_run_seconds;
        d["total_run_s"] = st.total_run_seconds;
        d["max_queued_s"] = st.max_queued_seconds;
        return d;
      })
      .def_property_readonly("workers", &RefreshScheduler::workers)
      .def("close", &RefreshScheduler::shutdown, py::call_guard<py::gil_scoped_release>(),
           "Cancel queued jobs, finish running ones and stop the workers (idempotent).")
      .def("__enter__", [](RefreshScheduler& s) -> RefreshScheduler& { return s; }, py::return_value_policy::reference)
      .def("__exit__", [](RefreshScheduler& s, py::args) {
        py::gil_scoped_release nogil;
        s.shutdown();
      });
}
