// Collectives for the data-parallel learner through libtorch's own c10d: a TCPStore for the
// rendezvous and a ProcessGroupGloo (the engine torch.distributed uses on CPU). Handles cross the
// boundary as opaque pointers; errors come back as a message, never as a C++ exception.
// torch 2.11 was built with both (Caffe2Targets.cmake); the c10d headers need them to declare
// ProcessGroupGloo.
#define USE_DISTRIBUTED 1
#define USE_C10D_GLOO 1

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

void write_error(const char* what, char* err, size_t err_len) {
  if (err_len == 0) return;
  std::strncpy(err, what, err_len - 1);
  err[err_len - 1] = '\0';
}

struct Store {
  c10::intrusive_ptr<c10d::TCPStore> store;
};

struct Group {
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
};

struct Work {
  c10::intrusive_ptr<c10d::Work> work;
};

}  // namespace

extern "C" {

// A TCPStore client (the server too when `is_server`) on host:port; `port` 0 with `is_server`
// binds any free port, reported in `*bound_port`. Connecting waits at most `timeout_ms`.
void* grpo_dist_store(const char* host, uint16_t port, int is_server, int world, int64_t timeout_ms,
                      uint16_t* bound_port, char* err, size_t err_len) {
  try {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    opts.numWorkers = static_cast<size_t>(world);
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *bound_port = store->getPort();
    return new Store{store};
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

void grpo_dist_store_free(void* store) { delete static_cast<Store*>(store); }

// Joins the gloo group of `world` ranks met through `store`, binding this rank's connections to
// `bind_host` (the address the other ranks reach it at). Every collective's own timeout is
// `timeout_ms`.
void* grpo_dist_group(void* store, int rank, int world, const char* bind_host, int64_t timeout_ms,
                      char* err, size_t err_len) {
  try {
    auto* s = static_cast<Store*>(store);
    auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(std::string(bind_host)));
    opts->threads = 2;
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::static_intrusive_pointer_cast<c10d::Store>(s->store), rank, world, opts);
    return new Group{pg};
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

void grpo_dist_group_free(void* group) { delete static_cast<Group*>(group); }

// Starts an in-place all-reduce of one dense CPU tensor: `op` 0 sums, 1 takes the maximum.
void* grpo_dist_allreduce(void* group, void* tensor, int op, char* err, size_t err_len) {
  try {
    auto* g = static_cast<Group*>(group);
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions opts;
    opts.reduceOp = op == 1 ? c10d::ReduceOp(c10d::ReduceOp::MAX) : c10d::ReduceOp(c10d::ReduceOp::SUM);
    return new Work{g->pg->allreduce(ts, opts)};
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

// Starts a broadcast of one dense CPU tensor from `root`, in place on every rank.
void* grpo_dist_broadcast(void* group, void* tensor, int root, char* err, size_t err_len) {
  try {
    auto* g = static_cast<Group*>(group);
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    return new Work{g->pg->broadcast(ts, opts)};
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

// Waits for a started collective at most `timeout_ms`; 0 when it completed, 1 with a message
// (a peer's failure, or the deadline) in `err`.
int grpo_dist_wait(void* work, int64_t timeout_ms, char* err, size_t err_len) {
  try {
    static_cast<Work*>(work)->work->wait(std::chrono::milliseconds(timeout_ms));
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return 1;
  }
}

void grpo_dist_work_free(void* work) { delete static_cast<Work*>(work); }

}  // extern "C"
